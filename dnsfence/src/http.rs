//! A small HTTP/1.x server for the metrics and health endpoints, bounded in connections, time
//! and bytes so that no client can keep a probe from being answered.
//!
//! One acceptor thread and one short-lived thread per connection, at most
//! [`MAX_CONNECTIONS`]: one more evicts the oldest that is not in its handler (still reading
//! its request head, or writing its answer and waiting for the client to close: its socket
//! is shut down, which ends its thread's read or write at once), so the acceptor never
//! waits; one whose answer is being made is never evicted (review finding: a flood of new
//! connections evicted the kubelet's probe mid-answer), and a client that never reads its
//! answer nor closes holds no slot against others (second review: 64 such connections
//! turned every probe away for 2 s). When every slot is in its handler, or [`MAX_THREADS`]
//! connection threads are still alive (a handler waiting on a lock outlives its socket's
//! eviction), the new connection is answered 503 without a thread and closed. Each connection has
//! [`DEADLINE`] from its accept to the last byte of its answer: every read and write is given
//! only what is left of it, so a client trickling a byte at a time is cut off too. One request
//! per connection: the request head is bounded to [`MAX_HEAD`] bytes, a request with a body is
//! refused (400), only `GET` and `HEAD` are served (405 with `Allow` otherwise), every answer
//! has `Content-Length` and `Connection: close`, and bytes after the request head (pipelined
//! requests) are read and ignored until the client closes. Nothing is printed per connection.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Most connections served at once; one more evicts the oldest not in its handler.
pub const MAX_CONNECTIONS: usize = 64;
/// Most connection threads alive at once, evicted ones still running included.
pub const MAX_THREADS: usize = 2 * MAX_CONNECTIONS;
/// How long a connection may take from its accept to the last byte of its answer (a client
/// that has not sent its request head by then is answered 408 and closed).
pub const DEADLINE: Duration = Duration::from_secs(2);
/// Most bytes of a request head (request line and headers); more is answered 400.
pub const MAX_HEAD: usize = 8 * 1024;
/// Most bytes read and ignored after the answer, waiting for the client to close (so that its
/// unread bytes do not make the kernel reset the connection before the answer is read).
const MAX_DRAIN: usize = 64 * 1024;

/// What a connection's thread gets for its stack (an answer is built on the heap).
const STACK: usize = 256 * 1024;

/// An answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The `Content-Type`.
    pub content_type: &'static str,
    /// The body (left out for `HEAD`; its length is the `Content-Length` either way).
    pub body: String,
    /// The `Allow` header, when there is one (405).
    pub allow: Option<&'static str>,
}

/// The media type of plain-text answers.
pub const PLAIN: &str = "text/plain; charset=utf-8";

impl Response {
    /// A plain-text answer.
    pub fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: PLAIN,
            body: body.into(),
            allow: None,
        }
    }

    /// The whole answer on the wire (`HEAD`: without the body).
    fn bytes(&self, head_only: bool) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        if let Some(allow) = self.allow {
            out.push_str(&format!("Allow: {allow}\r\n"));
        }
        out.push_str("\r\n");
        if !head_only {
            out.push_str(&self.body);
        }
        out.into_bytes()
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// What the handler is asked: the method (exactly as sent) and the path (without query).
pub type Handler = dyn Fn(&str, &str) -> Response + Send + Sync;

/// The open connections, oldest first: their ids, a handle to shut them down, and whether
/// they may be evicted (all but those in their handler).
type Open = Arc<Mutex<VecDeque<(u64, TcpStream, Arc<AtomicBool>)>>>;

/// Serves `listener` with `handler` from now on (threads that live as long as the process).
pub fn spawn(listener: TcpListener, handler: Arc<Handler>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("dnsf-http".into())
        .spawn(move || accept(&listener, &handler))?;
    Ok(())
}

fn accept(listener: &TcpListener, handler: &Arc<Handler>) {
    let open: Open = Arc::default();
    let live = Arc::new(AtomicUsize::new(0));
    let mut next_id = 0u64;
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            // Out of descriptors, or a connection reset in the queue: try again shortly.
            Err(_) => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let accepted = Instant::now();
        let Ok(handle) = stream.try_clone() else {
            continue;
        };
        next_id += 1;
        let id = next_id;
        let evictable = Arc::new(AtomicBool::new(true));
        {
            let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
            // No thread to serve it: refused before anything is evicted for it.
            if live.load(Ordering::Acquire) >= MAX_THREADS {
                drop(open);
                busy(stream, "too many connection threads alive");
                continue;
            }
            while open.len() >= MAX_CONNECTIONS {
                let Some(i) = open.iter().position(|(_, _, r)| r.load(Ordering::Acquire)) else {
                    break;
                };
                if let Some((_, oldest, _)) = open.remove(i) {
                    let _ = oldest.shutdown(Shutdown::Both);
                }
            }
            if open.len() >= MAX_CONNECTIONS {
                drop(open);
                busy(stream, "every connection slot is answering");
                continue;
            }
            open.push_back((id, handle, Arc::clone(&evictable)));
        }
        live.fetch_add(1, Ordering::AcqRel);
        let registered = Registered {
            open: Arc::clone(&open),
            id,
            live: Arc::clone(&live),
        };
        let handler = Arc::clone(handler);
        // A failed spawn drops the closure: the connection is closed and unregistered.
        let _ = std::thread::Builder::new()
            .name("dnsf-http-conn".into())
            .stack_size(STACK)
            .spawn(move || {
                let _registered = registered;
                serve(stream, accepted + DEADLINE, &evictable, &*handler);
            });
    }
}

/// A connection's entry in [`Open`] and its count in the live threads, both taken back when
/// its thread ends (or panics; a failed spawn drops it at once).
struct Registered {
    open: Open,
    id: u64,
    live: Arc<AtomicUsize>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|(id, _, _)| *id != self.id);
        self.live.fetch_sub(1, Ordering::AcqRel);
    }
}

/// No connection can be served now (`why`): a 503 if the send buffer takes it at once,
/// then the close (no thread, no wait).
fn busy(stream: TcpStream, why: &str) {
    let _ = stream.set_nonblocking(true);
    let busy = Response::text(503, format!("busy: {why}\n"));
    let _ = (&stream).write(&busy.bytes(false));
}

/// What is left until `deadline`, or a timeout error when nothing is.
fn left(deadline: Instant) -> std::io::Result<Duration> {
    match deadline.checked_duration_since(Instant::now()) {
        Some(left) if !left.is_zero() => Ok(left),
        _ => Err(ErrorKind::TimedOut.into()),
    }
}

/// One read that returns by `deadline`.
fn read_by(stream: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> std::io::Result<usize> {
    loop {
        stream.set_read_timeout(Some(left(deadline)?))?;
        match stream.read(buf) {
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Err(ErrorKind::TimedOut.into()),
            other => return other,
        }
    }
}

/// All of `bytes`, written by `deadline` (each write is given only what is left).
fn write_by(stream: &mut TcpStream, mut bytes: &[u8], deadline: Instant) -> std::io::Result<()> {
    while !bytes.is_empty() {
        stream.set_write_timeout(Some(left(deadline)?))?;
        match stream.write(bytes) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One connection: its request head, the answer, then the close. `evictable` is cleared
/// while the handler makes the answer.
fn serve(mut stream: TcpStream, deadline: Instant, evictable: &AtomicBool, handler: &Handler) {
    let mut head = [0u8; MAX_HEAD];
    let mut len = 0;
    // Where the last look for the head's end stopped: only the new bytes (and the three
    // before them) are looked at again (a client sending a byte at a time made each read
    // scan the whole head).
    let mut scanned: usize = 0;
    let end = loop {
        let from = scanned.saturating_sub(3);
        if let Some(end) = head_end(&head[from..len]) {
            break from + end;
        }
        scanned = len;
        if len == head.len() {
            let too_long = Response::text(400, "request head over 8 KiB\n");
            return answer(stream, &too_long, false, deadline);
        }
        match read_by(&mut stream, &mut head[len..], deadline) {
            Ok(0) => return,
            Ok(n) => len += n,
            Err(e) if e.kind() == ErrorKind::TimedOut => {
                // Too slow: a 408 if the send buffer takes it at once, then the close.
                let _ = stream.set_nonblocking(true);
                let slow = Response::text(408, "request not received in time\n");
                let _ = stream.write(&slow.bytes(false));
                return;
            }
            Err(_) => return,
        }
    };
    let (response, head_only) = match parse(&head[..end]) {
        Ok(request) => {
            evictable.store(false, Ordering::Release);
            let response = handler(request.method, request.path);
            evictable.store(true, Ordering::Release);
            (response, request.method == "HEAD")
        }
        Err(why) => (Response::text(400, format!("{why}\n")), false),
    };
    answer(stream, &response, head_only, deadline);
}

/// Writes `response`, closes the sending side, and reads (and ignores) what the client still
/// sends until it closes, bounded by `deadline` and [`MAX_DRAIN`].
fn answer(mut stream: TcpStream, response: &Response, head_only: bool, deadline: Instant) {
    if write_by(&mut stream, &response.bytes(head_only), deadline).is_err() {
        return;
    }
    let _ = stream.shutdown(Shutdown::Write);
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    while drained < MAX_DRAIN {
        match read_by(&mut stream, &mut sink, deadline) {
            Ok(0) | Err(_) => return,
            Ok(n) => drained += n,
        }
    }
}

/// Where the request head ends (after its empty line), if it does within `bytes`.
fn head_end(bytes: &[u8]) -> Option<usize> {
    let crlf = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4);
    let lf = bytes.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A parsed request head.
#[derive(Debug, PartialEq, Eq)]
struct Request<'a> {
    method: &'a str,
    path: &'a str,
}

/// The request line and the headers: a request with a body, or not HTTP/1.x, is refused.
fn parse(head: &[u8]) -> Result<Request<'_>, &'static str> {
    let text = std::str::from_utf8(head).map_err(|_| "request head not UTF-8")?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let line = lines.next().unwrap_or_default();
    let mut words = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Err("malformed request line");
    };
    if !matches!(version, "HTTP/1.0" | "HTTP/1.1") {
        return Err("HTTP/1.0 or HTTP/1.1 only");
    }
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err("malformed method");
    }
    for line in lines.take_while(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err("malformed header");
        };
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err("malformed header");
        }
        if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("a request body is not accepted");
        }
        if name.eq_ignore_ascii_case("content-length") {
            match value.trim().parse::<u64>() {
                Ok(0) => {}
                Ok(_) => return Err("a request body is not accepted"),
                Err(_) => return Err("malformed Content-Length"),
            }
        }
    }
    // Origin form (`/metrics?x`) or absolute form (`http://host/metrics`).
    let path = match target.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    };
    let path = path.split(['?', '#']).next().unwrap_or_default();
    Ok(Request { method, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_request_heads() {
        fn ok(head: &str) -> Result<Request<'_>, &'static str> {
            parse(head.as_bytes())
        }
        assert_eq!(
            ok("GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n\r\n"),
            Ok(Request {
                method: "GET",
                path: "/metrics"
            })
        );
        assert_eq!(
            ok("HEAD http://h:1/readyz HTTP/1.0\n\n"),
            Ok(Request {
                method: "HEAD",
                path: "/readyz"
            })
        );
        assert!(ok("GET /x HTTP/1.1\r\nContent-Length: 0\r\n\r\n").is_ok());
        for bad in [
            "GET /x HTTP/1.1\r\nContent-Length: 1\r\n\r\n",
            "GET /x HTTP/1.1\r\ncontent-length: x\r\n\r\n",
            "GET /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /x HTTP/2.0\r\n\r\n",
            "GET  /x HTTP/1.1\r\n\r\n",
            "GET /x\r\n\r\n",
            "GET /x HTTP/1.1\r\nNo colon\r\n\r\n",
            "GET /x HTTP/1.1\r\nBad name: y\r\n\r\n",
        ] {
            assert!(ok(bad).is_err(), "{bad:?}");
        }
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nGET"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\nA: b\n\n"), Some(21));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
    }

    /// The test server: `/slow` answers after 300 ms, anything else at once.
    fn server() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        spawn(
            listener,
            Arc::new(|_: &str, path: &str| {
                if path == "/slow" {
                    std::thread::sleep(Duration::from_millis(300));
                }
                Response::text(200, format!("ok {path}\n"))
            }),
        )
        .unwrap();
        addr
    }

    fn get(stream: &mut TcpStream, path: &str) {
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .unwrap();
    }

    fn answer_of(stream: &mut TcpStream) -> String {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut out = String::new();
        let _ = stream.read_to_string(&mut out);
        out
    }

    /// Review finding: a flood of new connections evicted the oldest connection whatever it
    /// was doing, a probe being answered included. Only connections still reading their
    /// request are evicted; one being answered gets its answer.
    #[test]
    fn a_connection_being_answered_is_never_evicted() {
        let addr = server();
        let mut probe = TcpStream::connect(addr).unwrap();
        get(&mut probe, "/slow");
        std::thread::sleep(Duration::from_millis(50));
        // Twice as many idle connections as there are slots, all newer than the probe.
        let idle: Vec<TcpStream> = (0..2 * MAX_CONNECTIONS)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        let text = answer_of(&mut probe);
        assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
        assert!(text.ends_with("ok /slow\n"), "{text:?}");
        drop(idle);
        // And the server still answers.
        let mut next = TcpStream::connect(addr).unwrap();
        get(&mut next, "/x");
        assert!(answer_of(&mut next).ends_with("ok /x\n"));
    }

    /// Second review finding: connections that sent a request and then neither read their
    /// answer nor closed held every slot for the whole deadline, and probes got 503. Only a
    /// connection whose handler runs holds its slot.
    #[test]
    fn clients_that_never_read_their_answers_hold_no_slot() {
        let addr = server();
        let stuck: Vec<TcpStream> = (0..MAX_CONNECTIONS)
            .map(|_| {
                let mut s = TcpStream::connect(addr).unwrap();
                get(&mut s, "/x");
                s
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        let mut probe = TcpStream::connect(addr).unwrap();
        get(&mut probe, "/healthz");
        let text = answer_of(&mut probe);
        assert!(text.ends_with("ok /healthz\n"), "{text:?}");
        drop(stuck);
    }

    /// When every slot is answering, a new connection gets a 503 at once (no thread, no
    /// wait), and the ones being answered finish.
    #[test]
    fn every_slot_answering_turns_new_connections_away() {
        let addr = server();
        let mut busy: Vec<TcpStream> = (0..MAX_CONNECTIONS)
            .map(|_| {
                let mut s = TcpStream::connect(addr).unwrap();
                get(&mut s, "/slow");
                s
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        let mut late = TcpStream::connect(addr).unwrap();
        get(&mut late, "/x");
        let text = answer_of(&mut late);
        assert!(text.starts_with("HTTP/1.1 503"), "{text:?}");
        for s in &mut busy {
            assert!(answer_of(s).ends_with("ok /slow\n"));
        }
    }

    #[test]
    fn head_answers_have_no_body_but_its_length() {
        let r = Response::text(200, "abc");
        let full = String::from_utf8(r.bytes(false)).unwrap();
        let head = String::from_utf8(r.bytes(true)).unwrap();
        assert!(full.ends_with("\r\n\r\nabc"), "{full}");
        assert!(
            head.ends_with("Content-Length: 3\r\nConnection: close\r\n\r\n"),
            "{head}"
        );
    }
}
