//! The agent socket, with real sockets in a temp dir.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use dnsfence_sync::conn::{
    AgentListener, Backoff, ConnError, admitted, connect_with_backoff, peer_of, try_connect,
};

fn mode(p: &std::path::Path) -> u32 {
    fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn bind_accept_and_peer_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listener = AgentListener::bind(&path).unwrap();
    assert_eq!(listener.path(), path);
    assert!(fs::symlink_metadata(&path).unwrap().file_type().is_socket());
    assert_eq!(mode(&path), 0o600);

    let mut client = try_connect(&path).unwrap();
    let (mut server, peer) = listener.accept().unwrap();
    assert_eq!(peer.pid, std::process::id() as i32);
    assert_eq!(peer, peer_of(&server).unwrap());
    assert_eq!(
        peer.uid,
        peer_of(&client).unwrap().uid,
        "same process, same uid"
    );
    assert_eq!(listener.rejected(), 0);
    client.write_all(b"hi").unwrap();
    let mut buf = [0u8; 2];
    server.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hi");

    // Dropping the listener removes its socket file.
    drop(listener);
    assert!(!path.exists());
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    // A socket file left by a process that is gone (std leaves the file on drop).
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let listener = AgentListener::bind(&path).unwrap();

    // A second agent while the first listens: refused, and the first keeps its socket.
    let err = AgentListener::bind(&path).unwrap_err();
    assert!(matches!(err, ConnError::InUse { .. }), "{err}");
    assert!(
        err.to_string().contains("another process is listening"),
        "{err}"
    );
    let _client = try_connect(&path).unwrap();
    listener.accept().unwrap();
}

#[test]
fn a_file_that_is_not_a_socket_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    fs::write(&path, b"precious").unwrap();
    let err = AgentListener::bind(&path).unwrap_err();
    assert!(matches!(err, ConnError::NotASocket { .. }), "{err}");
    assert_eq!(fs::read(&path).unwrap(), b"precious");
}

#[test]
fn the_drop_of_a_replaced_listener_keeps_the_new_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let old = AgentListener::bind(&path).unwrap();
    // A newer agent took the path over (e.g. after removing the file during an upgrade).
    fs::remove_file(&path).unwrap();
    let new = AgentListener::bind(&path).unwrap();
    drop(old);
    assert!(
        path.exists(),
        "the old listener removed the new one's socket"
    );
    let _c = try_connect(&path).unwrap();
    new.accept().unwrap();
}

#[test]
fn admission_rule() {
    assert!(admitted(1000, 1000));
    assert!(admitted(0, 1000), "root");
    assert!(!admitted(1001, 1000));
    assert!(admitted(0, 0));
    assert!(!admitted(65534, 0));
}

#[test]
fn a_nonblocking_listener_says_would_block() {
    let dir = tempfile::tempdir().unwrap();
    let listener = AgentListener::bind(dir.path().join("a.sock")).unwrap();
    listener.set_nonblocking(true).unwrap();
    match listener.accept() {
        Err(ConnError::Io { source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::WouldBlock)
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_accept_timeout_bounds_the_wait_and_a_peer_is_taken_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.sock");
    let listener = Arc::new(AgentListener::bind(&path).unwrap());
    listener
        .set_accept_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    // Nobody: an error that says so, after the timeout (not at once, not forever).
    let (tx, rx) = std::sync::mpsc::channel();
    let waiting = Arc::clone(&listener);
    let started = Instant::now();
    thread::spawn(move || {
        let _ = tx.send(waiting.accept().map(|_| ()));
    });
    let err = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the accept still waits after 5 s")
        .unwrap_err();
    let waited = started.elapsed();
    assert!(err.is_timeout(), "{err:?}");
    assert!(
        (Duration::from_millis(250)..Duration::from_secs(5)).contains(&waited),
        "{waited:?}"
    );
    // A peer that comes while the accept waits is taken when it connects.
    let connecting = thread::spawn(move || {
        thread::sleep(Duration::from_millis(100));
        let at = Instant::now();
        (try_connect(&path).unwrap(), at)
    });
    let (_stream, _peer) = listener.accept().unwrap();
    let accepted = Instant::now();
    let (_client, connected_at) = connecting.join().unwrap();
    assert!(
        accepted.duration_since(connected_at) < Duration::from_millis(200),
        "{:?}",
        accepted.duration_since(connected_at)
    );
    // Other errors are not timeouts.
    let other = ConnError::Io {
        op: "accept",
        path: "x".into(),
        source: std::io::Error::other("out of descriptors"),
    };
    assert!(!other.is_timeout());
}

#[test]
fn try_connect_never_waits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.sock");
    assert_eq!(
        try_connect(&path).unwrap_err().kind(),
        std::io::ErrorKind::NotFound
    );
    drop(UnixListener::bind(&path).unwrap());
    assert_eq!(
        try_connect(&path).unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );
    // A listener that never accepts: once its backlog is full, a blocking connect would
    // wait; this one returns WouldBlock. (In a thread, so that a regression fails the test
    // instead of hanging it.)
    fs::remove_file(&path).unwrap();
    let _l = UnixListener::bind(&path).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let mut held = Vec::new();
        let err = loop {
            match try_connect(&path) {
                Ok(s) => held.push(s),
                Err(e) => break e,
            }
            if held.len() > 100_000 {
                panic!("backlog never filled");
            }
        };
        let _ = tx.send(err.kind());
    });
    let kind = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("try_connect waited on a full backlog");
    assert_eq!(kind, std::io::ErrorKind::WouldBlock);
}

#[test]
fn backoff_grows_is_capped_and_jittered() {
    let initial = Duration::from_millis(10);
    let max = Duration::from_millis(300);
    let mut b = Backoff::new(initial, max);
    let mut ceilings = Vec::new();
    for n in 0..12u32 {
        let ceiling = (initial * 2u32.pow(n)).min(max);
        let d = b.next_delay();
        assert!(
            d >= ceiling / 2 && d <= ceiling,
            "attempt {n}: {d:?} vs {ceiling:?}"
        );
        ceilings.push(d);
    }
    assert_eq!(b.attempts(), 12);
    // Jittered: the capped delays are not all the same.
    let capped = &ceilings[6..];
    assert!(capped.iter().any(|d| *d != capped[0]), "{capped:?}");
    b.reset();
    assert!(b.next_delay() <= initial);
    // Far past the cap, no overflow.
    for _ in 0..100 {
        assert!(b.next_delay() <= max);
    }
}

#[test]
fn connect_with_backoff_waits_for_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let client_path = path.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let client_stop = stop.clone();
    let client = thread::spawn(move || {
        let mut b = Backoff::new(Duration::from_millis(5), Duration::from_millis(50));
        let s = connect_with_backoff(&client_path, &mut b, &client_stop);
        (s, b.attempts())
    });
    thread::sleep(Duration::from_millis(100));
    let listener = AgentListener::bind(&path).unwrap();
    let (_server, peer) = listener.accept().unwrap();
    assert_eq!(peer.pid, std::process::id() as i32);
    let (stream, attempts) = client.join().unwrap();
    stream.unwrap();
    assert_eq!(attempts, 0, "reset after connecting");
    assert!(!stop.load(Ordering::Relaxed));
}

#[test]
fn connect_with_backoff_stops_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nobody-listens.sock");
    let stop = Arc::new(AtomicBool::new(false));
    let client_stop = stop.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        // A long backoff: the stop flag must still be seen within ~100 ms.
        let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(10));
        let _ = tx.send(connect_with_backoff(&path, &mut b, &client_stop));
    });
    thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let err = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the stop flag was not seen")
        .unwrap_err();
    assert!(matches!(err, ConnError::Stopped { .. }), "{err}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}
