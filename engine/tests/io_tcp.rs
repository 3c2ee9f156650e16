//! DNS over TCP on real loopback sockets, on both backends.

mod io_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use dnsfence_engine::io::{BackendChoice, Io, ShardIo};
use io_support::*;

/// A DNS-sized message: 12-byte "header" starting with `id`, then `extra` bytes.
fn msg(id: u16, extra: usize) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.resize(12 + extra, id as u8);
    m
}

fn framed(m: &[u8]) -> Vec<u8> {
    let mut v = (m.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(m);
    v
}

fn read_frame(s: &mut TcpStream) -> Vec<u8> {
    let mut len = [0; 2];
    s.read_exact(&mut len).unwrap();
    let mut m = vec![0; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut m).unwrap();
    m
}

fn connect(io: &Io) -> TcpStream {
    let s = TcpStream::connect(io.local_addr()).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Reads until EOF (or reset); panics if data comes or the read times out.
fn expect_closed(s: &mut TcpStream) {
    let mut buf = [0; 16];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("got {n} bytes, expected close"),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("expected close, got {e}"),
    }
}

fn open_tcp(choice: BackendChoice, tweak: impl FnOnce(&mut dnsfence_engine::io::IoConfig)) -> Io {
    let mut c = config("127.0.0.1:0", no_upstream());
    tweak(&mut c);
    open(&c, choice)
}

#[test]
fn pipelined_queries_in_one_write_answered_out_of_order() {
    for_each_backend(|b| {
        let mut io = open_tcp(b, |_| {});
        let mut client = connect(&io);
        let mut wire = Vec::new();
        for id in 1..=3 {
            wire.extend(framed(&msg(id, 20 * usize::from(id))));
        }
        client.write_all(&wire).unwrap();
        let evs = poll_n(&mut io, 3);
        let mut conns = Vec::new();
        for (i, ev) in evs.iter().enumerate() {
            let Ev::TcpClient(conn, peer, data) = ev else {
                panic!("unexpected {ev:?}")
            };
            assert_eq!(*peer, client.local_addr().unwrap());
            assert_eq!(*data, msg(i as u16 + 1, 20 * (i + 1)));
            conns.push(*conn);
        }
        assert!(conns.iter().all(|&c| c == conns[0]));
        // Answer in reverse order.
        for id in (1..=3).rev() {
            io.send_client_tcp(conns[0], &msg(100 + id, 0));
        }
        io.flush().unwrap();
        for id in (1..=3).rev() {
            assert_eq!(read_frame(&mut client), msg(100 + id, 0));
        }
        assert_eq!(io.stats().tcp_rx_messages, 3);
        assert_eq!(io.stats().tcp_accepted, 1);

        // The client closes: the shard hears of it.
        drop(client);
        let evs = poll_n(&mut io, 1);
        assert_eq!(evs, [Ev::TcpClosed(conns[0])]);
        // Answers to a closed connection are dropped and counted.
        io.send_client_tcp(conns[0], &msg(9, 0));
        assert_eq!(io.stats().tcp_send_stale, 1);
    });
}

#[test]
fn query_split_byte_by_byte_is_delivered_once_complete() {
    for_each_backend(|b| {
        let mut io = open_tcp(b, |_| {});
        let mut client = connect(&io);
        let wire = framed(&msg(7, 30));
        let mut evs = Vec::new();
        for (i, byte) in wire.iter().enumerate() {
            client.write_all(&[*byte]).unwrap();
            io.poll(Some(Duration::from_millis(5)), &mut |e| {
                evs.push(Ev::from(e))
            })
            .unwrap();
            if i + 1 < wire.len() {
                assert!(evs.is_empty(), "delivered early at byte {i}: {evs:?}");
            }
        }
        let evs = if evs.is_empty() {
            poll_n(&mut io, 1)
        } else {
            evs
        };
        let [Ev::TcpClient(conn, _, data)] = &evs[..] else {
            panic!("unexpected {evs:?}")
        };
        assert_eq!(*data, msg(7, 30));
        io.send_client_tcp(*conn, &msg(8, 1));
        io.flush().unwrap();
        assert_eq!(read_frame(&mut client), msg(8, 1));
    });
}

#[test]
fn frame_lying_about_its_length_is_closed_at_the_idle_timeout() {
    for_each_backend(|b| {
        let mut io = open_tcp(b, |c| c.tcp_idle_timeout = Duration::from_millis(200));
        let mut client = connect(&io);
        // Announce 100 bytes, send 20, stop.
        let mut wire = 100u16.to_be_bytes().to_vec();
        wire.extend([0; 20]);
        client.write_all(&wire).unwrap();
        let start = std::time::Instant::now();
        let evs = poll_n(&mut io, 1);
        assert!(matches!(evs[..], [Ev::TcpClosed(_)]), "{evs:?}");
        assert!(start.elapsed() >= Duration::from_millis(150));
        assert_eq!(io.stats().tcp_idle_closed, 1);
        expect_closed(&mut client);
    });
}

/// A valid query, then in the same write a frame that cannot be a query: the query is
/// delivered and its answer written before the connection closes (at once, not at the idle
/// timeout).
fn answered_then_closed(b: BackendChoice, bad: &[u8], what: &str) {
    let mut io = open_tcp(b, |c| c.max_tcp_message = 512);
    let mut client = connect(&io);
    let mut wire = framed(&msg(1, 0));
    wire.extend_from_slice(bad);
    client.write_all(&wire).unwrap();
    let start = std::time::Instant::now();
    let evs = poll_n(&mut io, 1);
    let [Ev::TcpClient(conn, _, ref data)] = evs[..] else {
        panic!("{what}: unexpected {evs:?}")
    };
    assert_eq!(*data, msg(1, 0), "{what}");
    // Nothing after the bad frame is delivered, and the connection waits for its answer.
    let more = poll_until(&mut io, |_| start.elapsed() > Duration::from_millis(100));
    assert!(more.is_empty(), "{what}: {more:?}");
    assert_eq!(io.stats().tcp_framing_errors, 1, "{what}");
    io.send_client_tcp(conn, &msg(2, 3));
    io.flush().unwrap();
    assert_eq!(read_frame(&mut client), msg(2, 3), "{what}: answer owed");
    let evs = poll_n(&mut io, 1);
    assert_eq!(evs, [Ev::TcpClosed(conn)], "{what}");
    expect_closed(&mut client);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{what}: closed only after {:?} (idle timeout 5 s)",
        start.elapsed()
    );
}

#[test]
fn bad_frame_after_a_query_gets_the_answer_then_closes() {
    for_each_backend(|b| {
        for len in [0u16, 1, 5, 11, 513] {
            let mut bad = len.to_be_bytes().to_vec();
            bad.extend(vec![0; usize::from(len)]);
            answered_then_closed(b, &bad, &format!("length {len}"));
        }
        // A frame with QR set is a response, not a query: never delivered, never answered.
        let mut response = msg(3, 8);
        response[2] = 0x80;
        answered_then_closed(b, &framed(&response), "response frame");
    });
}

#[test]
fn garbage_frame_with_qr_set_closes_at_once() {
    for_each_backend(|b| {
        let mut io = open_tcp(b, |_| {});
        let mut client = connect(&io);
        // 65535 bytes of 0xff: a "header" with QR set and nothing that could be answered.
        client.write_all(&framed(&vec![0xff; 65535])).unwrap();
        let start = std::time::Instant::now();
        let evs = poll_n(&mut io, 1);
        assert!(matches!(evs[..], [Ev::TcpClosed(_)]), "{evs:?}");
        assert!(start.elapsed() < Duration::from_secs(2));
        assert_eq!(io.stats().tcp_framing_errors, 1);
        assert_eq!(io.stats().tcp_rx_messages, 0);
        expect_closed(&mut client);
    });
}

#[test]
fn connection_limit_evicts_the_connection_idle_longest() {
    for_each_backend(|b| {
        let mut io = open_tcp(b, |c| c.max_tcp_conns = 2);
        let mut first = connect(&io);
        let mut second = connect(&io);
        let start = std::time::Instant::now();
        while io.stats().tcp_accepted < 2 {
            assert!(start.elapsed() < DEADLINE, "{:?}", io.stats());
            io.poll(Some(Duration::from_millis(20)), &mut |_| {})
                .unwrap();
        }
        // The first makes progress: the second is now the one idle longest.
        first.write_all(&framed(&msg(1, 0))).unwrap();
        let evs = poll_n(&mut io, 1);
        let [Ev::TcpClient(first_conn, ..)] = evs[..] else {
            panic!("unexpected {evs:?}")
        };
        io.send_client_tcp(first_conn, &msg(1, 0));
        io.flush().unwrap();
        assert_eq!(read_frame(&mut first), msg(1, 0));
        let mut third = connect(&io);
        let evs = poll_n(&mut io, 1);
        assert!(matches!(evs[..], [Ev::TcpClosed(_)]), "{evs:?}");
        assert_eq!(io.stats().tcp_evicted, 1);
        assert_eq!(io.stats().tcp_limit_rejected, 0);
        assert_eq!(io.stats().tcp_accepted, 3);
        expect_closed(&mut second);
        // The first and the newcomer work.
        first.write_all(&framed(&msg(2, 0))).unwrap();
        third.write_all(&framed(&msg(3, 0))).unwrap();
        let evs = poll_n(&mut io, 2);
        for ev in evs {
            let Ev::TcpClient(conn, _, data) = ev else {
                panic!("unexpected {ev:?}")
            };
            io.send_client_tcp(conn, &data);
        }
        io.flush().unwrap();
        assert_eq!(read_frame(&mut first), msg(2, 0));
        assert_eq!(read_frame(&mut third), msg(3, 0));
    });
}

/// At the limit, a connection waiting for an answer is passed over for an idle one, even a
/// younger one: a client whose query is in flight upstream keeps its connection.
#[test]
fn eviction_spares_a_connection_waiting_for_its_answer() {
    for_each_backend(|b| {
        let mut io = open_tcp(b, |c| c.max_tcp_conns = 2);
        let mut waiting = connect(&io);
        waiting.write_all(&framed(&msg(1, 0))).unwrap();
        let evs = poll_n(&mut io, 1);
        let [Ev::TcpClient(waiting_conn, ..)] = evs[..] else {
            panic!("unexpected {evs:?}")
        };
        let mut idle = connect(&io);
        let start = std::time::Instant::now();
        while io.stats().tcp_accepted < 2 {
            assert!(start.elapsed() < DEADLINE, "{:?}", io.stats());
            io.poll(Some(Duration::from_millis(20)), &mut |_| {})
                .unwrap();
        }
        let _third = connect(&io);
        let evs = poll_n(&mut io, 1);
        assert!(
            matches!(evs[..], [Ev::TcpClosed(c)] if c != waiting_conn),
            "{evs:?}"
        );
        assert_eq!(io.stats().tcp_evicted, 1);
        expect_closed(&mut idle);
        // The answer still reaches the client that waited for it.
        io.send_client_tcp(waiting_conn, &msg(1, 5));
        io.flush().unwrap();
        assert_eq!(read_frame(&mut waiting), msg(1, 5));
    });
}

/// A client socket bound to `source` (a loopback address) connected to the shard.
fn connect_from(io: &Io, source: [u8; 4]) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from((source, 0)).into()).unwrap();
    s.connect(&io.local_addr().into()).unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

#[test]
fn per_source_limit_closes_the_extra_from_that_address_only() {
    for_each_backend(|b| {
        let mut io = open_tcp(b, |c| c.max_tcp_conns_per_source = 2);
        let mut a1 = connect_from(&io, [127, 0, 0, 1]);
        let mut a2 = connect_from(&io, [127, 0, 0, 1]);
        let mut a3 = connect_from(&io, [127, 0, 0, 1]);
        let mut other = connect_from(&io, [127, 0, 0, 2]);
        let start = std::time::Instant::now();
        while io.stats().tcp_accepted + io.stats().tcp_source_limit_rejected < 4 {
            assert!(start.elapsed() < DEADLINE, "{:?}", io.stats());
            io.poll(Some(Duration::from_millis(20)), &mut |_| {})
                .unwrap();
        }
        assert_eq!(io.stats().tcp_source_limit_rejected, 1);
        assert_eq!(io.stats().tcp_accepted, 3);
        expect_closed(&mut a3);
        for (i, c) in [&mut a1, &mut a2, &mut other].into_iter().enumerate() {
            c.write_all(&framed(&msg(i as u16, 0))).unwrap();
            let evs = poll_n(&mut io, 1);
            let [Ev::TcpClient(conn, _, ref data)] = evs[..] else {
                panic!("unexpected {evs:?}")
            };
            io.send_client_tcp(conn, data);
            io.flush().unwrap();
            assert_eq!(read_frame(c), msg(i as u16, 0));
        }
        // Once one closes, that address may connect again.
        drop(a1);
        let evs = poll_n(&mut io, 1);
        assert!(matches!(evs[..], [Ev::TcpClosed(_)]), "{evs:?}");
        let mut again = connect_from(&io, [127, 0, 0, 1]);
        again.write_all(&framed(&msg(9, 0))).unwrap();
        let evs = poll_n(&mut io, 1);
        assert!(matches!(evs[..], [Ev::TcpClient(..)]), "{evs:?}");
        assert_eq!(io.stats().tcp_source_limit_rejected, 1);
    });
}

/// Bytes that never complete a frame do not count as progress: a connection trickling a
/// frame one byte at a time is closed at the idle timeout, although bytes keep coming.
#[test]
fn trickled_bytes_do_not_reset_the_idle_timeout() {
    for_each_backend(|b| {
        let mut io = open_tcp(b, |c| c.tcp_idle_timeout = Duration::from_millis(300));
        let mut client = connect(&io);
        client.write_all(&[0x01]).unwrap();
        let start = std::time::Instant::now();
        let mut evs = Vec::new();
        let mut sent = 1;
        while evs.is_empty() {
            assert!(start.elapsed() < DEADLINE, "never closed; {:?}", io.stats());
            // One byte every 50 ms of a 300-byte frame: it never completes in time.
            if start.elapsed() >= Duration::from_millis(50 * sent) && client.write_all(&[0]).is_ok()
            {
                sent += 1;
            }
            io.poll(Some(Duration::from_millis(10)), &mut |e| {
                evs.push(Ev::from(e))
            })
            .unwrap();
        }
        assert!(matches!(evs[..], [Ev::TcpClosed(_)]), "{evs:?}");
        assert!(sent >= 5, "only {sent} bytes trickled before the close");
        assert!(
            start.elapsed() < Duration::from_millis(900),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(io.stats().tcp_idle_closed, 1);
    });
}

#[test]
fn client_that_does_not_read_is_closed_when_its_output_overflows() {
    for_each_backend(|b| {
        let mut io = open_tcp(b, |c| c.max_tcp_out_bytes = 1000);
        let mut client = connect(&io);
        let mut wire = Vec::new();
        for id in 0..4 {
            wire.extend(framed(&msg(id, 0)));
        }
        client.write_all(&wire).unwrap();
        let evs = poll_n(&mut io, 4);
        let Ev::TcpClient(conn, ..) = evs[0] else {
            panic!("unexpected {evs:?}")
        };
        // Four 400-byte answers queued before one flush: over 1000 bytes.
        for id in 0..4 {
            io.send_client_tcp(conn, &msg(id, 388));
        }
        assert_eq!(io.stats().tcp_out_overflow, 1);
        io.flush().unwrap();
        let evs = poll_n(&mut io, 1);
        assert_eq!(evs, [Ev::TcpClosed(conn)]);
    });
}

#[test]
fn pipeline_limit_holds_queries_until_answers_go_out() {
    for_each_backend(|b| {
        let mut io = open_tcp(b, |c| c.max_tcp_pipeline = 2);
        let mut client = connect(&io);
        let mut wire = Vec::new();
        for id in 0..5 {
            wire.extend(framed(&msg(id, 0)));
        }
        client.write_all(&wire).unwrap();
        let mut seen = Vec::new();
        while seen.len() < 5 {
            let evs = poll_n(&mut io, 1);
            assert!(evs.len() <= 2, "over the pipeline limit: {evs:?}");
            for ev in evs {
                let Ev::TcpClient(conn, _, data) = ev else {
                    panic!("unexpected {ev:?}")
                };
                io.send_client_tcp(conn, &data);
                seen.push(data);
            }
            io.flush().unwrap();
        }
        for id in 0..5 {
            assert_eq!(seen[usize::from(id)], msg(id, 0));
            assert_eq!(read_frame(&mut client), msg(id, 0));
        }
    });
}

/// A TCP echo server on loopback that serves connections until the test ends.
fn tcp_echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            thread::spawn(move || {
                let mut buf = [0; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn upstream_tcp_connects_lazily_and_pipelines() {
    let echo = tcp_echo();
    for_each_backend(|b| {
        let mut io = open(&config("127.0.0.1:0", echo), b);
        // Queued while the connection is being set up.
        for id in 0..3 {
            io.send_upstream_tcp(0, &msg(id, 50));
        }
        io.flush().unwrap();
        let evs = poll_n(&mut io, 3);
        let want: Vec<_> = (0..3).map(|id| Ev::TcpUpstream(0, msg(id, 50))).collect();
        assert_eq!(evs, want);
        assert_eq!(io.stats().upstream_tcp_connects, 1);
        // Same connection for more.
        io.send_upstream_tcp(0, &msg(9, 0));
        io.flush().unwrap();
        assert_eq!(poll_n(&mut io, 1), [Ev::TcpUpstream(0, msg(9, 0))]);
        assert_eq!(io.stats().upstream_tcp_connects, 1);
    });
}

#[test]
fn upstream_tcp_connection_refused_is_counted() {
    // A port with nothing listening.
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    for_each_backend(|b| {
        let mut io = open(&config("127.0.0.1:0", dead), b);
        io.send_upstream_tcp(0, &msg(1, 0));
        io.flush().unwrap();
        let start = std::time::Instant::now();
        let mut evs = Vec::new();
        while io.stats().upstream_tcp_errors == 0 || evs.is_empty() {
            assert!(start.elapsed() < DEADLINE, "{:?}", io.stats());
            io.poll(Some(Duration::from_millis(20)), &mut |e| {
                evs.push(Ev::from(e))
            })
            .unwrap();
        }
        assert_eq!(io.stats().upstream_tcp_connects, 0);
        assert_eq!(io.stats().upstream_tcp_dropped, 1);
        // The core learns that what it sent there is lost.
        assert_eq!(evs, [Ev::TcpUpstreamLost(0)]);
    });
}

/// Polls until some events come (at most `DEADLINE` from `start`).
fn poll_some(io: &mut Io, start: std::time::Instant) -> Vec<Ev> {
    let mut evs = Vec::new();
    while evs.is_empty() {
        assert!(start.elapsed() < DEADLINE, "{:?}", io.stats());
        io.poll(Some(Duration::from_millis(20)), &mut |e| {
            evs.push(Ev::from(e))
        })
        .unwrap();
    }
    evs
}

/// A server that reads one query and closes its connection without answering: the shard is
/// told once (its core re-sends on a new connection), and a new connection is opened for
/// what is sent next.
#[test]
fn an_upstream_tcp_connection_closed_before_the_answer_is_reported() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            let _ = read_frame(&mut s);
            drop(s);
        }
    });
    for_each_backend(|b| {
        let mut io = open(&config("127.0.0.1:0", addr), b);
        io.send_upstream_tcp(0, &msg(1, 10));
        io.flush().unwrap();
        let start = std::time::Instant::now();
        assert_eq!(poll_some(&mut io, start), [Ev::TcpUpstreamLost(0)]);
        io.send_upstream_tcp(0, &msg(2, 10));
        io.flush().unwrap();
        assert_eq!(poll_some(&mut io, start), [Ev::TcpUpstreamLost(0)]);
        assert_eq!(io.stats().upstream_tcp_connects, 2);
    });
}

/// One TCP connection per upstream server; each answer is tagged with its server.
#[test]
fn upstream_tcp_keeps_a_connection_per_server() {
    let (one, two) = (tcp_echo(), tcp_echo());
    for_each_backend(|b| {
        let mut c = config("127.0.0.1:0", one);
        c.upstreams = vec![one, two];
        let mut io = open(&c, b);
        io.send_upstream_tcp(1, &msg(1, 10));
        io.send_upstream_tcp(0, &msg(2, 10));
        io.send_upstream_tcp(1, &msg(3, 10));
        io.send_upstream_tcp(7, &msg(4, 10));
        io.flush().unwrap();
        let mut evs = poll_n(&mut io, 3);
        evs.sort_by_key(|e| format!("{e:?}"));
        assert_eq!(
            evs,
            [
                Ev::TcpUpstream(0, msg(2, 10)),
                Ev::TcpUpstream(1, msg(1, 10)),
                Ev::TcpUpstream(1, msg(3, 10)),
            ]
        );
        let s = io.stats();
        assert_eq!((s.upstream_tcp_connects, s.upstream_tcp_dropped), (2, 1));
    });
}
