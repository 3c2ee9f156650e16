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

#[test]
fn bad_frame_lengths_close_the_connection() {
    for_each_backend(|b| {
        let mut io = open_tcp(b, |c| c.max_tcp_message = 512);
        for (i, len) in [0u16, 11, 513].into_iter().enumerate() {
            let mut client = connect(&io);
            // A good query first: it is delivered before the bad frame closes.
            let mut wire = framed(&msg(1, 0));
            wire.extend(len.to_be_bytes());
            wire.extend(vec![0; usize::from(len)]);
            client.write_all(&wire).unwrap();
            let evs = poll_until(&mut io, |e| e.iter().any(|e| matches!(e, Ev::TcpClosed(_))));
            assert!(
                matches!(&evs[0], Ev::TcpClient(_, _, d) if *d == msg(1, 0)),
                "{evs:?}"
            );
            assert_eq!(io.stats().tcp_framing_errors, i as u64 + 1);
            expect_closed(&mut client);
        }
    });
}

#[test]
fn connection_limit_accepts_and_closes_the_extra() {
    for_each_backend(|b| {
        let mut io = open_tcp(b, |c| c.max_tcp_conns = 2);
        let mut first = connect(&io);
        let mut second = connect(&io);
        let mut third = connect(&io);
        let start = std::time::Instant::now();
        while io.stats().tcp_limit_rejected == 0 {
            assert!(start.elapsed() < DEADLINE, "{:?}", io.stats());
            io.poll(Some(Duration::from_millis(20)), &mut |_| {})
                .unwrap();
        }
        assert_eq!(io.stats().tcp_accepted, 2);
        expect_closed(&mut third);
        // The first two still work.
        first.write_all(&framed(&msg(1, 0))).unwrap();
        second.write_all(&framed(&msg(2, 0))).unwrap();
        let evs = poll_n(&mut io, 2);
        for ev in evs {
            let Ev::TcpClient(conn, _, data) = ev else {
                panic!("unexpected {ev:?}")
            };
            io.send_client_tcp(conn, &data);
        }
        io.flush().unwrap();
        assert_eq!(read_frame(&mut first), msg(1, 0));
        assert_eq!(read_frame(&mut second), msg(2, 0));
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
            io.send_upstream_tcp(&msg(id, 50));
        }
        io.flush().unwrap();
        let evs = poll_n(&mut io, 3);
        let want: Vec<_> = (0..3).map(|id| Ev::TcpUpstream(msg(id, 50))).collect();
        assert_eq!(evs, want);
        assert_eq!(io.stats().upstream_tcp_connects, 1);
        // Same connection for more.
        io.send_upstream_tcp(&msg(9, 0));
        io.flush().unwrap();
        assert_eq!(poll_n(&mut io, 1), [Ev::TcpUpstream(msg(9, 0))]);
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
        io.send_upstream_tcp(&msg(1, 0));
        io.flush().unwrap();
        let start = std::time::Instant::now();
        while io.stats().upstream_tcp_errors == 0 {
            assert!(start.elapsed() < DEADLINE, "{:?}", io.stats());
            io.poll(Some(Duration::from_millis(20)), &mut |_| {})
                .unwrap();
        }
        assert_eq!(io.stats().upstream_tcp_connects, 0);
        assert_eq!(io.stats().upstream_tcp_dropped, 1);
    });
}
