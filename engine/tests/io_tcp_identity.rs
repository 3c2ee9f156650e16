//! A TCP connection's identity never comes back: an answer owed to a closed connection is
//! never delivered to a later connection in the same slot, however many connections come and
//! go in between (issue 11: with 16-bit generations, 65,536 connections brought it back).

mod io_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use dnsfence_engine::io::{BackendChoice, ConnId, Io, ShardIo};
use io_support::*;

fn framed(id: u16) -> Vec<u8> {
    let mut m = vec![0, 12];
    m.extend(id.to_be_bytes());
    m.resize(14, 0);
    m
}

fn connect(io: &Io) -> TcpStream {
    let s = TcpStream::connect(io.local_addr()).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Closes with a reset (SO_LINGER 0): no TIME_WAIT left behind on the client's port.
fn reset(s: TcpStream) {
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
}

/// Polls until the connection `conn` is reported closed; returns the ids seen delivering.
fn until_closed(io: &mut Io, mut is_it: impl FnMut(ConnId) -> bool) {
    let start = Instant::now();
    let mut done = false;
    while !done {
        assert!(start.elapsed() < DEADLINE, "no close; {:?}", io.stats());
        io.poll(Some(Duration::from_millis(20)), &mut |e| {
            if let dnsfence_engine::io::Event::TcpClientClosed { conn } = e {
                done |= is_it(conn);
            }
        })
        .unwrap();
    }
}

fn answer_owed_to_a_closed_connection_is_never_delivered(b: BackendChoice) {
    // More connections than a 16-bit generation can tell apart, one at a time.
    const CYCLES: usize = 65_536;
    let mut io = open(&config("127.0.0.1:0", no_upstream()), b);
    let mut first = connect(&io);
    first.write_all(&framed(1)).unwrap();
    let evs = poll_n(&mut io, 1);
    let [Ev::TcpClient(owed, ..)] = evs[..] else {
        panic!("unexpected {evs:?}")
    };
    reset(first);
    until_closed(&mut io, |c| c == owed);
    let start = Instant::now();
    for _ in 1..CYCLES {
        let s = connect(&io);
        reset(s);
        // The slot is free again before the next connection takes it.
        until_closed(&mut io, |_| true);
    }
    eprintln!("{b:?}: {CYCLES} connections in {:?}", start.elapsed());
    assert_eq!(io.stats().tcp_accepted, CYCLES as u64);
    let mut last = connect(&io);
    last.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let before = io.stats().tcp_send_stale;
    // The answer to the first connection's query comes late: it must go nowhere.
    while io.stats().tcp_accepted == CYCLES as u64 {
        io.poll(Some(Duration::from_millis(20)), &mut |_| {})
            .unwrap();
    }
    io.send_client_tcp(owed, &framed(0xbad)[2..]);
    io.flush().unwrap();
    let mut buf = [0; 64];
    match last.read(&mut buf) {
        Ok(n) => panic!("the last connection received {n} bytes owed to the first"),
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{e}"
        ),
    }
    assert_eq!(io.stats().tcp_send_stale, before + 1);
    // The last connection itself is served.
    last.write_all(&framed(2)).unwrap();
    let evs = poll_n(&mut io, 1);
    let [Ev::TcpClient(conn, ..)] = evs[..] else {
        panic!("unexpected {evs:?}")
    };
    assert_ne!(conn, owed);
    io.send_client_tcp(conn, &framed(3)[2..]);
    io.flush().unwrap();
    last.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut got = [0; 14];
    last.read_exact(&mut got).unwrap();
    assert_eq!(got.to_vec(), framed(3));
}

#[test]
fn answer_owed_to_a_closed_connection_is_never_delivered_uring() {
    answer_owed_to_a_closed_connection_is_never_delivered(BackendChoice::Uring);
}

#[test]
fn answer_owed_to_a_closed_connection_is_never_delivered_mmsg() {
    answer_owed_to_a_closed_connection_is_never_delivered(BackendChoice::Mmsg);
}
