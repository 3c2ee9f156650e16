//! Socket setup: the shared (`SO_REUSEPORT`) listen sockets, the connected upstream UDP
//! sockets, the upstream TCP connection, and raw socket address conversion.

use std::io;
use std::net::{
    Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream, UdpSocket,
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::IoError;

/// The listen sockets of one shard.
#[derive(Debug)]
pub struct ListenSockets {
    /// UDP listen socket (nonblocking, `SO_REUSEPORT`).
    pub udp: UdpSocket,
    /// TCP listener (nonblocking, `SO_REUSEPORT`), when TCP is enabled.
    pub tcp: Option<TcpListener>,
    /// The bound address (the kernel-chosen port when asked for port 0).
    pub addr: SocketAddr,
}

/// Socket buffer sizes to ask for (best effort: the kernel caps them at `rmem_max`/`wmem_max`).
#[derive(Debug, Clone, Copy)]
pub struct BufferSizes {
    /// `SO_RCVBUF`.
    pub recv: usize,
    /// `SO_SNDBUF`.
    pub send: usize,
}

fn socket_err(op: &'static str, addr: SocketAddr) -> impl FnOnce(io::Error) -> IoError {
    move |source| IoError::Socket { op, addr, source }
}

fn new_socket(addr: SocketAddr, ty: Type, proto: Protocol) -> Result<Socket, IoError> {
    let socket = Socket::new(
        Domain::for_address(addr),
        ty.nonblocking().cloexec(),
        Some(proto),
    )
    .map_err(socket_err("creating socket for", addr))?;
    if addr.is_ipv6() {
        // One address family per socket: an IPv6 listener does not take IPv4-mapped traffic,
        // so every peer address is what it looks like (bind 0.0.0.0 as well for dual stack).
        socket
            .set_only_v6(true)
            .map_err(socket_err("setting IPV6_V6ONLY on", addr))?;
    }
    Ok(socket)
}

fn set_buffers(socket: &Socket, sizes: BufferSizes) {
    // Best effort: an unprivileged process gets at most the sysctl maximum, which is fine.
    let _ = socket.set_recv_buffer_size(sizes.recv);
    let _ = socket.set_send_buffer_size(sizes.send);
}

fn bind_shared(
    addr: SocketAddr,
    ty: Type,
    proto: Protocol,
    name: &'static str,
    sizes: BufferSizes,
) -> Result<Socket, IoError> {
    let socket = new_socket(addr, ty, proto)?;
    socket
        .set_reuse_port(true)
        .map_err(socket_err("setting SO_REUSEPORT on", addr))?;
    if ty == Type::STREAM {
        socket
            .set_reuse_address(true)
            .map_err(socket_err("setting SO_REUSEADDR on", addr))?;
    }
    set_buffers(&socket, sizes);
    socket.bind(&SockAddr::from(addr)).map_err(|e| {
        if e.raw_os_error() == Some(libc::EADDRINUSE) {
            IoError::ListenAddrInUse { addr, proto: name }
        } else {
            IoError::Socket {
                op: "binding",
                addr,
                source: e,
            }
        }
    })?;
    Ok(socket)
}

/// Binds the UDP listen socket (buffers `sizes`) and (when `tcp`) the TCP listener (buffers
/// `tcp_sizes`, which every accepted connection inherits) on `addr`, both with
/// `SO_REUSEPORT` so that other shards and the standalone proxy can bind the same address.
/// With port 0, UDP gets a kernel-chosen port and TCP is bound to the same one.
///
/// A socket without `SO_REUSEPORT` on the address gives [`IoError::ListenAddrInUse`].
pub fn bind_listen(
    addr: SocketAddr,
    tcp: bool,
    sizes: BufferSizes,
    tcp_sizes: BufferSizes,
) -> Result<ListenSockets, IoError> {
    // With port 0 the TCP port chosen for UDP may be taken: try a few ports.
    let tries = if addr.port() == 0 { 16 } else { 1 };
    let mut last = None;
    for _ in 0..tries {
        let udp = bind_shared(addr, Type::DGRAM, Protocol::UDP, "udp", sizes)?;
        let bound = udp
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .ok_or_else(|| IoError::Socket {
                op: "reading local address of",
                addr,
                source: io::Error::from(io::ErrorKind::InvalidData),
            })?;
        if !tcp {
            return Ok(ListenSockets {
                udp: udp.into(),
                tcp: None,
                addr: bound,
            });
        }
        // Accepted connections inherit the listener's buffer sizes.
        match bind_shared(bound, Type::STREAM, Protocol::TCP, "tcp", tcp_sizes) {
            Ok(listener) => {
                listener
                    .listen(1024)
                    .map_err(socket_err("listening on", bound))?;
                return Ok(ListenSockets {
                    udp: udp.into(),
                    tcp: Some(listener.into()),
                    addr: bound,
                });
            }
            Err(e @ IoError::ListenAddrInUse { .. }) if addr.port() == 0 => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or(IoError::ListenAddrInUse { addr, proto: "tcp" }))
}

/// `connect()`s a bound UDP listen socket to its own address, so that the kernel's
/// `SO_REUSEPORT` selection no longer picks it for datagrams of other sources; its queue
/// stays readable and it can still send to any peer. A socket bound to the unspecified
/// address is refused (connecting it would fix its source address to one local address, and
/// answers to others would fail; the agent and the proxy never bind one).
pub fn retire_udp(socket: &UdpSocket) -> io::Result<()> {
    let local = socket.local_addr()?;
    if local.ip().is_unspecified() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a wildcard listen socket cannot be retired",
        ));
    }
    socket.connect(local)
}

/// A UDP socket bound to a kernel-chosen ephemeral port and `connect()`ed to `upstream`:
/// the kernel drops datagrams from any other source.
pub fn upstream_udp(upstream: SocketAddr, sizes: BufferSizes) -> Result<UdpSocket, IoError> {
    let socket = new_socket(upstream, Type::DGRAM, Protocol::UDP)?;
    set_buffers(&socket, sizes);
    let any: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    socket
        .bind(&SockAddr::from(any))
        .map_err(socket_err("binding upstream socket for", upstream))?;
    socket
        .connect(&SockAddr::from(upstream))
        .map_err(socket_err("connecting upstream socket to", upstream))?;
    Ok(socket.into())
}

/// Starts a nonblocking TCP connection to `upstream` (it completes when writable).
pub fn upstream_tcp(upstream: SocketAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(
        Domain::for_address(upstream),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&SockAddr::from(upstream)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(socket.into())
}

/// An IPv4 or IPv6 socket address in the kernel's layout, for `msghdr.msg_name`.
///
/// Always fully initialised (it starts zeroed and only whole fields are written), so reading
/// any field is sound.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) union RawSockAddr {
    v4: libc::sockaddr_in,
    v6: libc::sockaddr_in6,
}

impl RawSockAddr {
    /// Size of the storage, the `msg_namelen` to offer the kernel.
    pub(crate) const CAPACITY: libc::socklen_t = size_of::<RawSockAddr>() as libc::socklen_t;

    /// An all-zero address (family `AF_UNSPEC`).
    pub(crate) const fn zeroed() -> Self {
        RawSockAddr {
            v6: libc::sockaddr_in6 {
                sin6_family: 0,
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: [0; 16] },
                sin6_scope_id: 0,
            },
        }
    }

    /// Stores `addr`; returns the length to put in `msg_namelen`.
    pub(crate) fn set(&mut self, addr: SocketAddr) -> libc::socklen_t {
        *self = Self::zeroed();
        match addr {
            SocketAddr::V4(a) => {
                self.v4 = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                size_of::<libc::sockaddr_in>() as libc::socklen_t
            }
            SocketAddr::V6(a) => {
                self.v6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                };
                size_of::<libc::sockaddr_in6>() as libc::socklen_t
            }
        }
    }

    /// The stored address, if it is IPv4 or IPv6 and `len` covers it.
    pub(crate) fn get(&self, len: libc::socklen_t) -> Option<SocketAddr> {
        // SAFETY: both variants start with the `sa_family_t` family field and the union is
        // always fully initialised with plain integers (see the type's doc), so every read
        // of a field is of initialised memory with no invalid bit patterns.
        let family = unsafe { self.v4.sin_family };
        let len = len as usize;
        match i32::from(family) {
            libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
                // SAFETY: as above; the family says the v4 variant was written.
                let a = unsafe { self.v4 };
                Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(a.sin_addr.s_addr.to_ne_bytes()),
                    u16::from_be(a.sin_port),
                )))
            }
            libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
                // SAFETY: as above; the family says the v6 variant was written.
                let a = unsafe { self.v6 };
                Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(a.sin6_addr.s6_addr),
                    u16::from_be(a.sin6_port),
                    a.sin6_flowinfo,
                    a.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }

    /// Pointer for `msg_name`.
    pub(crate) fn as_mut_ptr(&mut self) -> *mut libc::c_void {
        (self as *mut Self).cast()
    }
}

/// Parses a socket address from the bytes the kernel wrote (io_uring multishot `recvmsg`
/// puts the name in the buffer).
pub(crate) fn parse_sockaddr(b: &[u8]) -> Option<SocketAddr> {
    let family = i32::from(u16::from_ne_bytes(b.get(0..2)?.try_into().ok()?));
    let port = u16::from_be_bytes(b.get(2..4)?.try_into().ok()?);
    match family {
        libc::AF_INET if b.len() >= size_of::<libc::sockaddr_in>() => {
            let ip: [u8; 4] = b.get(4..8)?.try_into().ok()?;
            Some(SocketAddr::V4(SocketAddrV4::new(ip.into(), port)))
        }
        libc::AF_INET6 if b.len() >= size_of::<libc::sockaddr_in6>() => {
            let flow = u32::from_ne_bytes(b.get(4..8)?.try_into().ok()?);
            let ip: [u8; 16] = b.get(8..24)?.try_into().ok()?;
            let scope = u32::from_ne_bytes(b.get(24..28)?.try_into().ok()?);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip.into(),
                port,
                flow,
                scope,
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_listener_gets_its_own_buffer_sizes() {
        let big = BufferSizes {
            recv: 1 << 20,
            send: 1 << 20,
        };
        let small = BufferSizes {
            recv: 32 * 1024,
            send: 32 * 1024,
        };
        let l = bind_listen("127.0.0.1:0".parse().unwrap(), true, big, small).unwrap();
        let tcp = l.tcp.expect("listener");
        let _client = std::net::TcpStream::connect(l.addr).unwrap();
        let (conn, _) = tcp.accept().unwrap();
        let conn = socket2::SockRef::from(&conn);
        // The kernel doubles what it is asked for (bookkeeping overhead).
        assert_eq!(conn.recv_buffer_size().unwrap(), 64 * 1024);
        assert_eq!(conn.send_buffer_size().unwrap(), 64 * 1024);
        let udp = socket2::SockRef::from(&l.udp);
        assert!(udp.recv_buffer_size().unwrap() > 64 * 1024);
    }

    #[test]
    fn raw_addr_round_trips() {
        for a in [
            "127.0.0.1:53",
            "10.1.2.3:65535",
            "[::1]:5353",
            "[fd00::5%3]:1",
        ] {
            let a: SocketAddr = a.parse().unwrap();
            let mut raw = RawSockAddr::zeroed();
            let len = raw.set(a);
            assert_eq!(raw.get(len), Some(a));
            assert_eq!(raw.get(len - 1), None);
        }
        assert_eq!(RawSockAddr::zeroed().get(RawSockAddr::CAPACITY), None);
    }

    #[test]
    fn parse_sockaddr_matches_raw() {
        for a in ["192.0.2.7:1234", "[2001:db8::9]:53"] {
            let a: SocketAddr = a.parse().unwrap();
            let mut raw = RawSockAddr::zeroed();
            let len = raw.set(a) as usize;
            // SAFETY: RawSockAddr is plain, fully initialised integers (see its doc).
            let bytes = unsafe {
                std::slice::from_raw_parts((&raw as *const RawSockAddr).cast::<u8>(), len)
            };
            assert_eq!(parse_sockaddr(bytes), Some(a));
            assert_eq!(parse_sockaddr(&bytes[..len - 1]), None);
        }
    }
}
