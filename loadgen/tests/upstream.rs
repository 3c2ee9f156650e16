//! The bundled upstream over real sockets, replies checked with hickory-proto.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RData;

use common::UpstreamProcess;
use dnsfence_loadgen::queries::{EncodeOptions, QuerySet};
use dnsfence_loadgen::upstream::respond::Responder;

fn query(id: u16, name: &str, qtype: &str, edns: bool) -> Vec<u8> {
    let options = EncodeOptions {
        edns_udp_size: edns.then_some(1232),
        ..EncodeOptions::default()
    };
    let set = QuerySet::parse(&format!("{name} {qtype}"), options).unwrap();
    let mut q = set.message(0).to_vec();
    q[..2].copy_from_slice(&id.to_be_bytes());
    q
}

fn client() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s
}

fn ask(server: SocketAddr, q: &[u8]) -> Option<Vec<u8>> {
    let s = client();
    s.send_to(q, server).unwrap();
    let mut buf = [0u8; 4096];
    s.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
}

fn ask_msg(server: SocketAddr, name: &str, qtype: &str) -> (Vec<u8>, Message) {
    let raw = ask(server, &query(0x1234, name, qtype, false)).expect("a reply");
    let msg = Message::from_vec(&raw).expect("parse");
    assert_eq!(msg.metadata.id, 0x1234);
    (raw, msg)
}

fn addresses(msg: &Message) -> Vec<IpAddr> {
    msg.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

#[test]
fn answers_deterministic_addresses_and_keeps_the_question() {
    let up = UpstreamProcess::start(&["--ips", "3", "--ttl", "42"]);
    let (raw, msg) = ask_msg(up.addr, "WwW.ExAmple.COM", "A");
    assert_eq!(msg.metadata.response_code, ResponseCode::NoError);
    // The question is echoed as sent (0x20 case).
    assert_eq!(&raw[12..29], b"\x03WwW\x07ExAmple\x03COM\x00");
    let expected = Responder {
        ips: 3,
        ..Responder::default()
    }
    .addresses("www.example.com");
    let got = addresses(&msg);
    assert_eq!(
        got,
        expected
            .0
            .iter()
            .map(|a| IpAddr::V4(*a))
            .collect::<Vec<_>>()
    );
    assert!(
        got.iter()
            .all(|a| matches!(a, IpAddr::V4(v) if v.octets()[0] == 127))
    );
    assert!(msg.answers.iter().all(|r| r.ttl == 42));
    let (_, msg6) = ask_msg(up.addr, "www.example.com", "AAAA");
    let got6 = addresses(&msg6);
    assert_eq!(got6.len(), 3);
    assert!(
        got6.iter()
            .all(|a| matches!(a, IpAddr::V6(v) if v.segments()[0] >> 8 == 0xfd))
    );
    // Other types: NOERROR, no answers.
    let (_, mx) = ask_msg(up.addr, "www.example.com", "MX");
    assert_eq!(mx.metadata.response_code, ResponseCode::NoError);
    assert!(mx.answers.is_empty());
    assert_eq!(up.terminate(), Some(0));
}

#[test]
fn name_driven_behaviours() {
    let up = UpstreamProcess::start(&["--prefix4", "198.18.0.0/15"]);
    // CNAME chain.
    let (_, msg) = ask_msg(up.addr, "cname-3-Foo.example", "A");
    let names: Vec<String> = msg.answers.iter().map(|r| r.name.to_string()).collect();
    let targets: Vec<String> = msg
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::CNAME(c) => Some(c.0.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(
        names,
        [
            "cname-3-Foo.example.",
            "cname-2-Foo.example.",
            "cname-1-Foo.example.",
            "cname-0-Foo.example."
        ]
    );
    assert_eq!(
        targets,
        [
            "cname-2-Foo.example.",
            "cname-1-Foo.example.",
            "cname-0-Foo.example."
        ]
    );
    // The chain ends in the records the last name has on its own.
    let (_, direct) = ask_msg(up.addr, "cname-0-foo.example", "A");
    assert_eq!(addresses(&msg), addresses(&direct));
    assert!(matches!(addresses(&msg)[0], IpAddr::V4(v) if v.octets()[..1] == [198]));

    for (name, rcode) in [
        ("nxdomain-a.example", ResponseCode::NXDomain),
        ("servfail-a.example", ResponseCode::ServFail),
        ("refused-a.example", ResponseCode::Refused),
    ] {
        let (_, msg) = ask_msg(up.addr, name, "A");
        assert_eq!(msg.metadata.response_code, rcode, "{name}");
        assert!(msg.answers.is_empty(), "{name}");
    }

    // Extra, unrelated records.
    let (_, msg) = ask_msg(up.addr, "extra-a.example", "A");
    let owners: Vec<String> = msg.answers.iter().map(|r| r.name.to_string()).collect();
    assert_eq!(owners, ["extra-a.example.", "poison.dnsfence.invalid."]);
    assert_eq!(
        msg.additionals[0].name.to_string(),
        "glue.dnsfence.invalid."
    );

    // Dropped by name.
    assert!(ask(up.addr, &query(1, "drop-a.example", "A", false)).is_none());

    // EDNS0 is echoed.
    let raw = ask(up.addr, &query(7, "e.example", "AAAA", true)).unwrap();
    let msg = Message::from_vec(&raw).unwrap();
    assert!(msg.edns.is_some());
    assert_eq!(addresses(&msg).len(), 1);
    assert_eq!(up.terminate(), Some(0));
}

#[test]
fn truncates_over_udp_and_answers_in_full_over_tcp() {
    let up = UpstreamProcess::start(&["--ips", "2"]);
    let (_, msg) = ask_msg(up.addr, "tc-big.example", "A");
    assert!(msg.metadata.truncation);
    assert!(msg.answers.is_empty());

    let mut tcp = TcpStream::connect(up.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    // Two queries in one write, and a third after: several queries per connection.
    let mut out = Vec::new();
    for (id, name) in [(1u16, "tc-big.example"), (2, "cname-2-x.example")] {
        let q = query(id, name, "A", false);
        out.extend_from_slice(&(q.len() as u16).to_be_bytes());
        out.extend_from_slice(&q);
    }
    tcp.write_all(&out).unwrap();
    let read_one = |tcp: &mut TcpStream| {
        let mut len = [0u8; 2];
        tcp.read_exact(&mut len).unwrap();
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        tcp.read_exact(&mut buf).unwrap();
        Message::from_vec(&buf).unwrap()
    };
    let first = read_one(&mut tcp);
    assert_eq!(first.metadata.id, 1);
    assert!(!first.metadata.truncation);
    assert_eq!(addresses(&first).len(), 2);
    let second = read_one(&mut tcp);
    assert_eq!(second.metadata.id, 2);
    assert_eq!(second.answers.len(), 4);
    let q = query(3, "nxdomain-z.example", "A", false);
    tcp.write_all(&(q.len() as u16).to_be_bytes()).unwrap();
    tcp.write_all(&q).unwrap();
    let third = read_one(&mut tcp);
    assert_eq!(third.metadata.response_code, ResponseCode::NXDomain);
    drop(tcp);
    assert_eq!(up.terminate(), Some(0));
}

#[test]
fn garbage_is_dropped_or_formerr_and_the_server_keeps_going() {
    let up = UpstreamProcess::start(&[]);
    assert!(ask(up.addr, &[0xde, 0xad]).is_none());
    // A response (QR set) is not answered.
    let mut r = query(9, "a.example", "A", false);
    r[2] |= 0x80;
    assert!(ask(up.addr, &r).is_none());
    // A question that runs past the end: FORMERR.
    let q = query(10, "a.example", "A", false);
    let raw = ask(up.addr, &q[..q.len() - 3]).expect("FORMERR reply");
    assert_eq!(raw[3] & 0xF, 1);
    assert_eq!(&raw[..2], &[0, 10]);
    let mut rng = fastrand::Rng::with_seed(3);
    let s = client();
    for _ in 0..2000 {
        let mut g = q.clone();
        g.truncate(rng.usize(..=g.len()));
        if let Some(b) = g.get_mut(rng.usize(..q.len())) {
            *b = rng.u8(..);
        }
        s.send_to(&g, up.addr).unwrap();
    }
    let (_, msg) = ask_msg(up.addr, "still.alive.example", "A");
    assert_eq!(addresses(&msg).len(), 1);
    assert_eq!(up.terminate(), Some(0));
}

#[test]
fn delays_and_deterministic_drops() {
    let up = UpstreamProcess::start(&["--delay-ms", "150"]);
    let start = Instant::now();
    ask_msg(up.addr, "a.example", "A");
    assert!(start.elapsed() >= Duration::from_millis(150));
    let start = Instant::now();
    ask_msg(up.addr, "delay-200-a.example", "A");
    assert!(start.elapsed() >= Duration::from_millis(350));
    assert_eq!(up.terminate(), Some(0));

    let up = UpstreamProcess::start(&["--delay-ms", "20-60"]);
    let start = Instant::now();
    ask_msg(up.addr, "a.example", "A");
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(20) && took < Duration::from_millis(1000));
    assert_eq!(up.terminate(), Some(0));

    let answered = |seed: &str| {
        let up = UpstreamProcess::start(&["--drop-rate", "0.5", "--seed", seed]);
        let s = client();
        for id in 0..100u16 {
            s.send_to(&query(id, "d.example", "A", false), up.addr)
                .unwrap();
        }
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut got = vec![false; 100];
        let mut buf = [0u8; 512];
        while let Ok(n) = s.recv(&mut buf) {
            if n >= 2 {
                got[usize::from(u16::from_be_bytes([buf[0], buf[1]])) % 100] = true;
            }
        }
        assert_eq!(up.terminate(), Some(0));
        got
    };
    let first = answered("7");
    let n = first.iter().filter(|&&a| a).count();
    assert!(
        (25..=75).contains(&n),
        "{n} of 100 answered at drop rate 0.5"
    );
    assert_eq!(first, answered("7"), "the same seed drops the same queries");
}
