//! UDP I/O on real loopback sockets, on both backends.

mod io_support;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use dnsfence_engine::io::{self, Backend, BackendChoice, IoError, ShardIo};
use io_support::*;

fn client(like: SocketAddr) -> UdpSocket {
    let s = UdpSocket::bind(any_port_like(like)).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s
}

fn client_round_trip(listen: &str, choice: BackendChoice) {
    let mut io = open(&config(listen, no_upstream()), choice);
    let server = io.local_addr();
    assert_ne!(server.port(), 0);
    let clients: Vec<_> = (0..50).map(|_| client(server)).collect();
    for (i, c) in clients.iter().enumerate() {
        c.send_to(format!("query {i}").as_bytes(), server).unwrap();
    }
    let evs = poll_n(&mut io, clients.len());
    assert_eq!(evs.len(), clients.len());
    for ev in &evs {
        let Ev::Client(peer, data) = ev else {
            panic!("unexpected {ev:?}")
        };
        let mut answer = b"answer to ".to_vec();
        answer.extend_from_slice(data);
        io.send_client_udp(*peer, &answer);
    }
    io.flush().unwrap();
    for (i, c) in clients.iter().enumerate() {
        let mut buf = [0; 100];
        let (n, from) = c.recv_from(&mut buf).unwrap();
        assert_eq!(from, server);
        assert_eq!(&buf[..n], format!("answer to query {i}").as_bytes());
    }
    assert_eq!(io.stats().udp_rx, 50);
    assert_eq!(io.stats().udp_tx, 50);
}

#[test]
fn client_datagrams_round_trip_ipv4() {
    for_each_backend(|b| client_round_trip("127.0.0.1:0", b));
}

#[test]
fn client_datagrams_round_trip_ipv6() {
    for_each_backend(|b| client_round_trip("[::1]:0", b));
}

/// A UDP echo server on loopback, stopped on drop.
struct Echo {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Echo {
    fn start() -> Self {
        Self::start_on("127.0.0.1:0")
    }

    fn start_on(addr: &str) -> Self {
        let s = UdpSocket::bind(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let addr = s.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = thread::spawn(move || {
            let mut buf = [0; 65536];
            while !stop2.load(Ordering::Relaxed) {
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(&buf[..n], from);
                }
            }
        });
        Self {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn upstream_sockets_round_trip_and_filter_other_sources() {
    let echo = Echo::start();
    for_each_backend(|b| {
        let mut io = open(&config("127.0.0.1:0", echo.addr), b);
        // Each upstream socket has its own ephemeral port.
        let ports: std::collections::HashSet<_> = (0..4)
            .map(|i| io.upstream_local_addr(i).unwrap().port())
            .collect();
        assert_eq!(ports.len(), 4);
        assert!(io.upstream_local_addr(4).is_none());
        for i in 0..4u16 {
            io.send_upstream_udp(i, format!("to upstream {i}").as_bytes());
        }
        io.flush().unwrap();
        let mut evs = poll_n(&mut io, 4);
        evs.sort_by_key(|e| match e {
            Ev::Upstream(s, ..) => *s,
            _ => u16::MAX,
        });
        for (i, ev) in evs.iter().enumerate() {
            assert_eq!(
                *ev,
                Ev::Upstream(i as u16, echo.addr, format!("to upstream {i}").into_bytes())
            );
        }

        // A datagram from another source to an upstream socket is dropped by the kernel
        // (connected socket). Send it first, then a real answer: only the answer arrives.
        let rogue = UdpSocket::bind("127.0.0.1:0").unwrap();
        rogue
            .send_to(b"spoofed answer", io.upstream_local_addr(0).unwrap())
            .unwrap();
        io.send_upstream_udp(0, b"genuine");
        io.flush().unwrap();
        let evs = poll_n(&mut io, 1);
        assert_eq!(evs, [Ev::Upstream(0, echo.addr, b"genuine".to_vec())]);
    });
}

#[test]
fn batches_500_datagrams() {
    for_each_backend(|b| {
        let mut io = open(&config("127.0.0.1:0", no_upstream()), b);
        let server = io.local_addr();
        let clients: Vec<_> = (0..5).map(|_| client(server)).collect();
        for i in 0..500u32 {
            clients[i as usize % 5]
                .send_to(&i.to_be_bytes(), server)
                .unwrap();
        }
        let evs = poll_n(&mut io, 500);
        assert_eq!(evs.len(), 500);
        let rx_batches = io.stats().udp_rx_batches;
        assert!(rx_batches <= 250, "{rx_batches} receive batches for 500");
        for ev in &evs {
            let Ev::Client(peer, data) = ev else {
                panic!("unexpected {ev:?}")
            };
            io.send_client_udp(*peer, data);
        }
        let before = io.stats().udp_tx_batches;
        io.flush().unwrap();
        let tx_batches = io.stats().udp_tx_batches - before;
        assert!(tx_batches <= 2, "{tx_batches} send batches for 500");
        let mut got = 0;
        for c in &clients {
            for _ in 0..100 {
                let mut buf = [0; 8];
                let n = c.recv(&mut buf).unwrap();
                assert_eq!(n, 4);
                got += 1;
            }
        }
        assert_eq!(got, 500);
        assert_eq!(io.stats().udp_tx, 500);
    });
}

#[test]
fn two_opens_share_the_listen_address() {
    for_each_backend(|b| {
        let mut first = open(&config("127.0.0.1:0", no_upstream()), b);
        let addr = first.local_addr();
        let mut second = open(&config(&addr.to_string(), no_upstream()), b);
        assert_eq!(second.local_addr(), addr);
        let clients: Vec<_> = (0..64).map(|_| client(addr)).collect();
        for c in &clients {
            c.send_to(b"hello", addr).unwrap();
        }
        let (mut n1, mut n2) = (0, 0);
        let start = std::time::Instant::now();
        while n1 + n2 < 64 {
            assert!(start.elapsed() < DEADLINE, "got {n1} + {n2}");
            n1 += first
                .poll(Some(Duration::from_millis(10)), &mut |_| {})
                .unwrap();
            n2 += second
                .poll(Some(Duration::from_millis(10)), &mut |_| {})
                .unwrap();
        }
        assert_eq!(n1 + n2, 64);
        assert!(n1 > 0 && n2 > 0, "SO_REUSEPORT spread: {n1} / {n2}");
    });
}

#[test]
fn listen_address_taken_without_reuseport_is_a_typed_error() {
    for_each_backend(|b| {
        let plain = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = plain.local_addr().unwrap();
        match io::open(&config(&addr.to_string(), no_upstream()), b) {
            Err(IoError::ListenAddrInUse { addr: a, proto }) => {
                assert_eq!((a, proto), (addr, "udp"));
            }
            Err(e) => panic!("wrong error {e}"),
            Ok(_) => panic!("open succeeded on a taken address"),
        }

        // A TCP port whose UDP twin is free (a random TCP port's UDP number can belong to
        // another process, and then the UDP error comes first): take both, free the UDP one.
        let (plain, addr) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
            let addr = udp.local_addr().unwrap();
            if let Ok(tcp) = std::net::TcpListener::bind(addr) {
                drop(udp);
                break (tcp, addr);
            }
        };
        let _keep = &plain;
        let err = io::open(&config(&addr.to_string(), no_upstream()), b)
            .err()
            .expect("open succeeded on a taken TCP address");
        assert!(
            matches!(err, IoError::ListenAddrInUse { proto: "tcp", .. }),
            "{err}"
        );
        assert!(err.to_string().contains("SO_REUSEPORT"));
    });
}

#[test]
fn auto_picks_uring_here() {
    let io = io::open(&config("127.0.0.1:0", no_upstream()), BackendChoice::Auto).unwrap();
    assert_eq!(io.backend(), Backend::Uring);
}

fn refused() -> std::io::Result<()> {
    Err(std::io::Error::from_raw_os_error(libc::EPERM))
}

#[test]
fn auto_falls_back_to_mmsg_when_uring_is_refused() {
    let c = config("127.0.0.1:0", no_upstream());
    let mut io = io::open_with_probe(&c, BackendChoice::Auto, refused).unwrap();
    assert_eq!(io.backend(), Backend::Mmsg);
    // And it works.
    let server = io.local_addr();
    let cl = client(server);
    cl.send_to(b"ping", server).unwrap();
    let evs = poll_n(&mut io, 1);
    assert!(matches!(&evs[0], Ev::Client(_, d) if d == b"ping"));

    match io::open_with_probe(&c, BackendChoice::Uring, refused) {
        Err(IoError::UringRefused(_)) => {}
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("explicit uring succeeded though refused"),
    }
}

#[test]
fn uring_rearms_multishot_receive_after_running_out_of_buffers() {
    let mut c = config("127.0.0.1:0", no_upstream());
    c.uring_recv_buffers = 4;
    let mut io = open(&c, BackendChoice::Uring);
    let server = io.local_addr();
    let cl = client(server);
    for i in 0..100u32 {
        cl.send_to(&i.to_be_bytes(), server).unwrap();
    }
    let evs = poll_n(&mut io, 100);
    let got: Vec<u32> = evs
        .iter()
        .map(|e| match e {
            Ev::Client(_, d) => u32::from_be_bytes(d[..4].try_into().unwrap()),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(got, (0..100).collect::<Vec<_>>(), "lost or reordered");
    let s = io.stats();
    assert!(s.uring_enobufs >= 1, "{s:?}");
    assert!(s.uring_rearms >= 1, "{s:?}");
}

/// The shard pattern: opened on one thread (datagrams may already arrive), then moved to
/// another that polls, answers and drops it (io_uring: the ring is bound to the thread that
/// first uses it, not to the one that opened it).
#[test]
fn opened_on_one_thread_served_and_dropped_on_another() {
    for_each_backend(|b| {
        let io = open(&config("127.0.0.1:0", no_upstream()), b);
        let server = io.local_addr();
        let cl = client(server);
        for i in 0..10u32 {
            cl.send_to(&i.to_be_bytes(), server).unwrap();
        }
        let served = thread::spawn(move || {
            let mut io = io;
            let evs = poll_n(&mut io, 10);
            for ev in &evs {
                let Ev::Client(peer, data) = ev else {
                    panic!("unexpected {ev:?}")
                };
                io.send_client_udp(*peer, data);
            }
            io.flush().unwrap();
            // Dropped here, sends possibly still in flight: drop waits for them.
            drop(io);
            evs.len()
        })
        .join()
        .unwrap();
        assert_eq!(served, 10);
        for i in 0..10u32 {
            let mut buf = [0; 16];
            let (n, from) = cl.recv_from(&mut buf).unwrap();
            assert_eq!(from, server);
            assert_eq!(&buf[..n], &i.to_be_bytes());
        }
    });
}

#[test]
fn replaced_upstream_socket_gets_a_fresh_port_and_the_old_one_is_closed() {
    let echo = Echo::start();
    for_each_backend(|b| {
        let mut io = open(&config("127.0.0.1:0", echo.addr), b);
        let mut seen = std::collections::HashSet::new();
        let mut old = io.upstream_local_addr(1).unwrap();
        seen.insert(old.port());
        // Several replacements in a row: each new socket receives, the old port is gone.
        for round in 0..5u8 {
            io.replace_upstream_udp(1).unwrap();
            let new = io.upstream_local_addr(1).unwrap();
            assert!(seen.insert(new.port()), "port {} reused", new.port());
            // The old port is closed: binding it again works (nothing holds it). With
            // io_uring the cancelled receive lets go of it when the kernel has run the cancel.
            let start = std::time::Instant::now();
            while UdpSocket::bind(old).is_err() {
                assert!(start.elapsed() < DEADLINE, "old port {old} still open");
                io.poll(Some(Duration::from_millis(5)), &mut |e| panic!("{e:?}"))
                    .unwrap();
            }
            let msg = [b'r', round];
            io.send_upstream_udp(1, &msg);
            io.flush().unwrap();
            let evs = poll_n(&mut io, 1);
            assert_eq!(evs, [Ev::Upstream(1, echo.addr, msg.to_vec())]);
            old = new;
        }
        assert_eq!(io.stats().upstream_sockets_replaced, 5);
        // The other sockets were not touched.
        io.send_upstream_udp(0, b"zero");
        io.flush().unwrap();
        assert_eq!(
            poll_n(&mut io, 1),
            [Ev::Upstream(0, echo.addr, b"zero".to_vec())]
        );
        assert!(io.replace_upstream_udp(4).is_err());
    });
}

#[test]
fn icmp_port_unreachable_is_reported_at_once() {
    for_each_backend(|b| {
        // A port nothing listens on: the kernel answers with ICMP port unreachable.
        let closed = UdpSocket::bind("127.0.0.1:0").unwrap();
        let upstream = closed.local_addr().unwrap();
        drop(closed);
        let mut io = open(&config("127.0.0.1:0", upstream), b);
        let start = std::time::Instant::now();
        io.send_upstream_udp(2, b"anyone there?");
        io.flush().unwrap();
        let evs = poll_until(&mut io, |e| e.contains(&Ev::Unreachable(2)));
        assert!(
            start.elapsed() < Duration::from_millis(100),
            "{:?}",
            start.elapsed()
        );
        assert!(evs.iter().all(|e| *e == Ev::Unreachable(2)), "{evs:?}");
        // A second query on the same socket is reported again (by its send or its receive).
        io.send_upstream_udp(2, b"still?");
        io.flush().unwrap();
        poll_until(&mut io, |e| e.contains(&Ev::Unreachable(2)));
    });
}

#[test]
fn every_dropped_send_is_counted_by_direction() {
    for_each_backend(|b| {
        let mut c = config("127.0.0.1:0", no_upstream());
        c.max_udp_payload = 512;
        let mut io = open(&c, b);
        let peer = "127.0.0.1:9".parse().unwrap();
        io.send_client_udp(peer, &[0; 600]);
        io.send_upstream_udp(0, &[0; 600]);
        io.send_upstream_udp(9, b"no such socket");
        io.send_client_tcp(12345, b"no such connection");
        io.flush().unwrap();
        let s = io.stats();
        assert_eq!((s.client_sends_dropped, s.upstream_sends_dropped), (2, 2));
    });
}

/// Several upstream servers: each gets its own connected sockets (socket `k` is server
/// `k / upstream_sockets`'s), so no port is shared between servers and each still drops
/// datagrams from anyone else; a replacement stays with its server.
#[test]
fn each_upstream_server_has_its_own_connected_sockets() {
    let v4 = Echo::start();
    let v6 = Echo::start_on("[::1]:0");
    for_each_backend(|b| {
        let mut c = config("127.0.0.1:0", v4.addr);
        c.upstreams = vec![v4.addr, v6.addr];
        c.upstream_sockets = 2;
        let mut io = open(&c, b);
        assert!(io.upstream_local_addr(4).is_none());
        for socket in 0..4u16 {
            io.send_upstream_udp(socket, format!("to {socket}").as_bytes());
        }
        io.flush().unwrap();
        let mut evs = poll_n(&mut io, 4);
        evs.sort_by_key(|e| format!("{e:?}"));
        let want: Vec<Ev> = (0..4u16)
            .map(|k| {
                let server = if k < 2 { v4.addr } else { v6.addr };
                Ev::Upstream(k, server, format!("to {k}").into_bytes())
            })
            .collect();
        assert_eq!(evs, want);
        // A replacement stays connected to its server: a datagram from anyone else is
        // dropped by the kernel (were it not, it would be the first event below).
        io.replace_upstream_udp(3).unwrap();
        let rogue = UdpSocket::bind("[::1]:0").unwrap();
        let port = io.upstream_local_addr(3).unwrap().port();
        rogue.send_to(b"spoofed", ("::1", port)).unwrap();
        io.send_upstream_udp(3, b"after");
        io.flush().unwrap();
        assert_eq!(
            poll_n(&mut io, 1),
            [Ev::Upstream(3, v6.addr, b"after".to_vec())]
        );
    });
}

/// Everything `io` has received within `wait`, as (peer, payload).
fn drain_clients(io: &mut io::Io, wait: Duration) -> Vec<(SocketAddr, Vec<u8>)> {
    let mut got = Vec::new();
    let end = std::time::Instant::now() + wait;
    while std::time::Instant::now() < end {
        io.poll(Some(Duration::from_millis(20)), &mut |e| {
            if let Ev::Client(peer, data) = Ev::from(e) {
                got.push((peer, data));
            }
        })
        .expect("poll");
    }
    got
}

/// A retired listen socket (graceful stop without eBPF) gets no new datagram: the kernel's
/// SO_REUSEPORT choice goes to the other socket of the port, while what the retired one
/// already held is still read, and its answers still reach their clients.
fn retired_listen_socket(listen: &str, choice: BackendChoice) {
    let mut old = open(&config(listen, no_upstream()), choice);
    let port = old.local_addr();
    let mut new = open(&config(&port.to_string(), no_upstream()), choice);
    let before: Vec<_> = (0..32).map(|_| client(port)).collect();
    for (i, c) in before.iter().enumerate() {
        c.send_to(format!("before {i}").as_bytes(), port).unwrap();
    }
    old.retire_listen_udp();
    let after: Vec<_> = (0..64).map(|_| client(port)).collect();
    for (i, c) in after.iter().enumerate() {
        c.send_to(format!("after {i}").as_bytes(), port).unwrap();
    }
    let at_old = drain_clients(&mut old, Duration::from_millis(300));
    let at_new = drain_clients(&mut new, Duration::from_millis(300));
    assert!(
        at_old.iter().all(|(_, d)| d.starts_with(b"before")),
        "a new datagram reached the retired socket: {at_old:?}"
    );
    assert!(
        !at_old.is_empty(),
        "the hash sent none of 32 to the old socket"
    );
    assert_eq!(at_old.len() + at_new.len(), 96, "{at_old:?} {at_new:?}");
    // The retired socket still answers what it held.
    let (peer, data) = at_old[0].clone();
    old.send_client_udp(peer, &data);
    old.flush().unwrap();
    let c = before
        .iter()
        .find(|c| c.local_addr().unwrap() == peer)
        .expect("a client");
    let mut buf = [0; 100];
    let (n, from) = c.recv_from(&mut buf).unwrap();
    assert_eq!((from, &buf[..n]), (port, &data[..]));
}

#[test]
fn a_retired_listen_socket_takes_no_new_datagrams_and_keeps_its_queue() {
    for_each_backend(|b| retired_listen_socket("127.0.0.1:0", b));
    for_each_backend(|b| retired_listen_socket("[::1]:0", b));
}

/// The send-burst tests' start: 16 send slots, a client for the answers (`sink`), and one
/// (`asker`) whose `query` lands once receives are armed (a first poll), so that on io_uring
/// its completion comes up among the burst's.
fn burst_setup(b: BackendChoice, query: &[u8]) -> (io::Io, UdpSocket, UdpSocket) {
    let mut c = config("127.0.0.1:0", no_upstream());
    c.send_queue = 16;
    let mut io = open(&c, b);
    let server = io.local_addr();
    let (sink, asker) = (client(server), client(server));
    assert_eq!(io.poll(Some(Duration::ZERO), &mut |_| {}).unwrap(), 0);
    asker.send_to(query, server).unwrap();
    thread::sleep(Duration::from_millis(50));
    (io, sink, asker)
}

/// A burst of answers larger than the send queue, with flushes but no poll between (the
/// shard's last loop at shutdown SERVFAILs everything in flight at once; an ICMP error fails
/// a whole socket's queries): every datagram goes out, as on the mmsg backend, and a client
/// query that arrived meanwhile is still delivered by the next poll (review of the io_uring
/// backend: the ring dropped all but the first `send_queue` until a poll reaped them).
#[test]
fn a_burst_larger_than_the_send_queue_is_sent_whole() {
    for_each_backend(|b| {
        let (mut io, sink, asker) = burst_setup(b, b"late query");
        sink.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let peer = sink.local_addr().unwrap();
        // Every fifth to an address the IPv4 socket cannot send to: failed sends, whose slots
        // must come back as well.
        let unsendable: SocketAddr = "[::1]:9".parse().unwrap();
        const N: usize = 250;
        for i in 0..N {
            if i % 5 == 4 {
                io.send_client_udp(unsendable, b"unsendable");
            } else {
                io.send_client_udp(peer, format!("answer {i}").as_bytes());
            }
            if i % 8 == 7 {
                io.flush().unwrap();
            }
        }
        io.flush().unwrap();
        let mut buf = [0; 64];
        for i in (0..N).filter(|i| i % 5 != 4) {
            let (n, _) = sink.recv_from(&mut buf).expect("an answer missing");
            assert_eq!(&buf[..n], format!("answer {i}").as_bytes());
        }
        assert_eq!(io.stats().send_dropped, 0);
        let evs = poll_n(&mut io, 1);
        assert!(
            matches!(&evs[0], Ev::Client(p, d) if *p == asker.local_addr().unwrap() && d == b"late query"),
            "{evs:?}"
        );
    });
}

/// A send that failed on an upstream socket replaced before its failure was reaped says
/// nothing about the replacement: no `Unreachable` for the new socket (its queries would be
/// failed for the old one's ICMP error).
#[test]
fn a_failed_send_of_a_replaced_socket_is_not_blamed_on_its_replacement() {
    for_each_backend(|b| {
        let closed = UdpSocket::bind("127.0.0.1:0").unwrap();
        let upstream = closed.local_addr().unwrap();
        drop(closed);
        let mut io = open(&config("127.0.0.1:0", upstream), b);
        // No poll yet: the receive queued at open is submitted with the first send, but its
        // retry on the ICMP error is completion work that only a poll runs (DEFER_TASKRUN),
        // so the error waits on the socket for the second send, which fails with it.
        io.send_upstream_udp(2, b"first");
        io.flush().unwrap();
        thread::sleep(Duration::from_millis(50));
        io.send_upstream_udp(2, b"second");
        io.flush().unwrap();
        io.replace_upstream_udp(2).unwrap();
        let mut evs = Vec::new();
        for _ in 0..5 {
            io.poll(Some(Duration::from_millis(20)), &mut |e| {
                evs.push(Ev::from(e))
            })
            .unwrap();
        }
        assert!(!evs.contains(&Ev::Unreachable(2)), "{evs:?}");
        if b == BackendChoice::Uring {
            // The case it is about did happen: the second send failed.
            assert_eq!(io.stats().send_errors, 1);
        }
    });
}

/// Completions taken off the ring while reclaiming send slots and not yet handled by a poll
/// are accounted for when the I/O is dropped: the drop (the end of a shard, right after its
/// last burst of answers) does not wait out its bound for completions it already took.
#[test]
fn a_drop_right_after_a_send_burst_does_not_wait() {
    for_each_backend(|b| {
        let (mut io, sink, _asker) = burst_setup(b, b"query");
        let peer = sink.local_addr().unwrap();
        // Every fourth to an address the IPv4 socket cannot send to: failed sends, whose
        // completions are kept for the next poll.
        let unsendable: SocketAddr = "[::1]:9".parse().unwrap();
        for i in 0..100 {
            let to = if i % 4 == 0 { unsendable } else { peer };
            io.send_client_udp(to, format!("answer {i}").as_bytes());
        }
        io.flush().unwrap();
        let start = std::time::Instant::now();
        drop(io);
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "drop took {:?}",
            start.elapsed()
        );
    });
}

/// A send queued (not yet flushed) when its socket is replaced goes out from the new socket,
/// whose receive gets the answer; the old port is closed and would lose it.
#[test]
fn a_send_queued_before_a_socket_replacement_goes_from_the_new_socket() {
    let echo = Echo::start();
    for_each_backend(|b| {
        let mut io = open(&config("127.0.0.1:0", echo.addr), b);
        // One round trip first: the receives are armed and running.
        io.send_upstream_udp(1, b"warm");
        io.flush().unwrap();
        assert_eq!(
            poll_n(&mut io, 1),
            [Ev::Upstream(1, echo.addr, b"warm".to_vec())]
        );
        io.send_upstream_udp(1, b"queued");
        io.replace_upstream_udp(1).unwrap();
        io.flush().unwrap();
        assert_eq!(
            poll_n(&mut io, 1),
            [Ev::Upstream(1, echo.addr, b"queued".to_vec())]
        );
    });
}

/// An empty datagram from the upstream is a datagram (it ends io_uring's multishot receive,
/// which must not lose what follows or count an error).
#[test]
fn an_empty_upstream_datagram_is_delivered_and_the_next_one_too() {
    let echo = Echo::start();
    for_each_backend(|b| {
        let mut io = open(&config("127.0.0.1:0", echo.addr), b);
        io.send_upstream_udp(2, b"");
        io.flush().unwrap();
        assert_eq!(poll_n(&mut io, 1), [Ev::Upstream(2, echo.addr, Vec::new())]);
        io.send_upstream_udp(2, b"next");
        io.flush().unwrap();
        assert_eq!(
            poll_n(&mut io, 1),
            [Ev::Upstream(2, echo.addr, b"next".to_vec())]
        );
        assert_eq!(io.stats().udp_rx_errors, 0);
        assert_eq!(io.stats().udp_rx, 2);
    });
}

/// More sockets than `uring_entries`: every receive is queued at open without the ring
/// submitting anything (which would tie it to the opening thread), and each socket receives.
#[test]
fn more_sockets_than_ring_entries_open_on_one_thread_and_serve_on_another() {
    let echo = Echo::start();
    let mut c = config("127.0.0.1:0", echo.addr);
    c.uring_entries = 8;
    c.upstream_sockets = 16;
    c.tcp = false;
    let io = open(&c, BackendChoice::Uring);
    thread::spawn(move || {
        let mut io = io;
        for s in 0..16u16 {
            io.send_upstream_udp(s, &s.to_be_bytes());
        }
        io.flush().unwrap();
        let mut evs = poll_n(&mut io, 16);
        evs.sort_by_key(|e| match e {
            Ev::Upstream(s, ..) => *s,
            _ => u16::MAX,
        });
        let want: Vec<_> = (0..16u16)
            .map(|s| Ev::Upstream(s, echo.addr, s.to_be_bytes().to_vec()))
            .collect();
        assert_eq!(evs, want);
    })
    .join()
    .unwrap();
}
