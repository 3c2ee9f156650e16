//! Answers are matched by socket, ID and question: a fake server answers with wrong IDs,
//! swapped questions, duplicates and garbage, none of which count as answers.

mod common;

use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{query_file, run_json, u};

/// A reply to `query` (header and question copied, QR set, no answers).
fn reply(query: &[u8]) -> Vec<u8> {
    let mut r = query.to_vec();
    r[2] |= 0x80;
    r
}

#[test]
fn wrong_ids_swapped_questions_and_duplicates_are_not_answers() {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let server = socket.local_addr().unwrap().to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let fake = {
        let stop = stop.clone();
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut buf = [0u8; 4096];
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let Ok((len, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let q = &buf[..len];
                match n % 4 {
                    // A correct answer.
                    0 => {
                        socket.send_to(&reply(q), from).unwrap();
                    }
                    // A wrong ID, then garbage: neither is an answer; the query times out.
                    1 => {
                        let mut r = reply(q);
                        r[0] ^= 0x80;
                        socket.send_to(&r, from).unwrap();
                        socket.send_to(&[1, 2, 3], from).unwrap();
                    }
                    // The right ID with another question: mismatched; the query times out.
                    2 => {
                        let mut r = reply(q);
                        let at = r.len() - 5;
                        r[at] = b'z'; // last letter of the name
                        socket.send_to(&r, from).unwrap();
                    }
                    // A correct answer, twice: one answer, one unexpected.
                    _ => {
                        let r = reply(q);
                        socket.send_to(&r, from).unwrap();
                        socket.send_to(&r, from).unwrap();
                    }
                }
                n += 1;
            }
            n
        })
    };
    let queries = query_file("matching", "alpha.example A\nbeta.example A\n");
    let report = run_json(
        &[
            "--server",
            &server,
            "--queries",
            queries.to_str().unwrap(),
            "--rate",
            "400",
            "--duration",
            "1",
            "--timeout",
            "300",
        ],
        Duration::from_secs(10),
    );
    stop.store(true, Ordering::Relaxed);
    let received = fake.join().unwrap();
    assert_eq!(received, 400);
    assert_eq!(u(&report, "sent"), 400);
    assert_eq!(u(&report, "answered"), 200, "{report}");
    assert_eq!(u(&report, "timeouts"), 200, "{report}");
    assert_eq!(u(&report, "mismatched"), 100, "{report}");
    assert_eq!(u(&report, "unexpected"), 200, "{report}");
    assert_eq!(u(&report, "malformed"), 100, "{report}");
    assert_eq!(report["rcodes"]["NOERROR"], 200);
}

#[test]
fn a_silent_server_means_timeouts_within_the_bound() {
    // Nothing listens here (the socket is bound but never read).
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let server = socket.local_addr().unwrap().to_string();
    let queries = query_file("silent", "a.example A\n");
    let start = Instant::now();
    let report = run_json(
        &[
            "--server",
            &server,
            "--queries",
            queries.to_str().unwrap(),
            "--rate",
            "100",
            "--duration",
            "1",
            "--timeout",
            "200",
        ],
        Duration::from_secs(10),
    );
    assert!(start.elapsed() < Duration::from_secs(4));
    assert_eq!(u(&report, "sent"), 100);
    assert_eq!(u(&report, "timeouts"), 100);
    assert_eq!(u(&report, "answered"), 0);
    assert_eq!(report["timeline"][0]["p99_us"], 0);
}
