//! Helpers shared by the io_* integration tests: run a body on both backends, poll with a
//! deadline, owned copies of events.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dnsfence_engine::io::{self, Backend, BackendChoice, ConnId, Event, Io, IoConfig, ShardIo};

/// Every test finishes within this, or fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// An owned copy of an [`Event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ev {
    Client(SocketAddr, Vec<u8>),
    Upstream(u16, SocketAddr, Vec<u8>),
    Unreachable(u16),
    TcpClient(ConnId, SocketAddr, Vec<u8>),
    TcpUpstream(u16, Vec<u8>),
    TcpClosed(ConnId),
    TcpUpstreamLost(u16),
}

impl From<Event<'_>> for Ev {
    fn from(e: Event<'_>) -> Self {
        match e {
            Event::ClientDatagram { peer, data } => Ev::Client(peer, data.to_vec()),
            Event::UpstreamDatagram { socket, from, data } => {
                Ev::Upstream(socket, from, data.to_vec())
            }
            Event::TcpClientMessage { conn, peer, data } => {
                Ev::TcpClient(conn, peer, data.to_vec())
            }
            Event::UpstreamUnreachable { socket } => Ev::Unreachable(socket),
            Event::TcpUpstreamMessage { server, data } => Ev::TcpUpstream(server, data.to_vec()),
            Event::TcpClientClosed { conn } => Ev::TcpClosed(conn),
            Event::TcpUpstreamClosed { server } => Ev::TcpUpstreamLost(server),
        }
    }
}

/// Runs `body` once per backend (io_uring, then mmsg), naming the backend if it panics.
pub fn for_each_backend(body: impl Fn(BackendChoice)) {
    for choice in [BackendChoice::Uring, BackendChoice::Mmsg] {
        eprintln!("--- backend {choice:?}");
        body(choice);
    }
}

/// A test configuration: listen on `listen` (port 0 usually), upstream `upstream`.
pub fn config(listen: &str, upstream: SocketAddr) -> IoConfig {
    let mut c = IoConfig::new(listen.parse().unwrap(), upstream);
    c.tcp_idle_timeout = Duration::from_secs(5);
    c
}

/// Opens with `choice` and checks the backend is the one asked for.
pub fn open(config: &IoConfig, choice: BackendChoice) -> Io {
    let io = io::open(config, choice).expect("open");
    let want = match choice {
        BackendChoice::Uring => Backend::Uring,
        BackendChoice::Mmsg => Backend::Mmsg,
        BackendChoice::Auto => io.backend(),
    };
    assert_eq!(io.backend(), want);
    io
}

/// Polls `io` until `done(all events so far)` holds; panics after [`DEADLINE`].
pub fn poll_until(io: &mut Io, mut done: impl FnMut(&[Ev]) -> bool) -> Vec<Ev> {
    let start = Instant::now();
    let mut evs = Vec::new();
    while !done(&evs) {
        assert!(
            start.elapsed() < DEADLINE,
            "timed out; events so far: {evs:?}; stats: {:?}",
            io.stats()
        );
        io.poll(Some(Duration::from_millis(50)), &mut |e| {
            evs.push(Ev::from(e))
        })
        .expect("poll");
    }
    evs
}

/// Polls until `n` events have come.
pub fn poll_n(io: &mut Io, n: usize) -> Vec<Ev> {
    poll_until(io, |e| e.len() >= n)
}

/// A loopback address of the same family as `addr`, port 0.
pub fn any_port_like(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => "127.0.0.1:0".parse().unwrap(),
        SocketAddr::V6(_) => "[::1]:0".parse().unwrap(),
    }
}

/// An upstream address where nothing listens (UDP discard on loopback; only used when the test
/// never talks to the upstream).
pub fn no_upstream() -> SocketAddr {
    "127.0.0.1:9".parse().unwrap()
}
