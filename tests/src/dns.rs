//! DNS clients for the tests: hand-built queries, raw UDP/TCP exchanges, a `dig` wrapper, and
//! the metrics page.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

pub use hickory_proto::op::{Message, ResponseCode};
pub use hickory_proto::rr::RData;

/// Type A.
pub const TYPE_A: u16 = 1;
/// Type AAAA.
pub const TYPE_AAAA: u16 = 28;
/// Type TXT.
pub const TYPE_TXT: u16 = 16;

/// Wire form of a dotted name, labels as given (case kept).
pub fn name_wire(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

/// A query (RD set, class IN), with an EDNS0 OPT record of that UDP size when given.
pub fn query(id: u16, name: &str, qtype: u16, edns: Option<u16>) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns.is_some())]);
    q.extend_from_slice(&name_wire(name));
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    if let Some(size) = edns {
        q.extend_from_slice(&[0, 0, 41]);
        q.extend_from_slice(&size.to_be_bytes());
        q.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    }
    q
}

/// A client UDP socket on 127.0.0.1 (ephemeral port) with a read timeout.
pub fn udp_client(timeout: Duration) -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind client socket");
    s.set_read_timeout(Some(timeout)).expect("read timeout");
    s
}

/// Sends `packet` from a fresh socket (::1 for an IPv6 server) and returns the first reply
/// within `timeout`.
pub fn udp_exchange(server: SocketAddr, packet: &[u8], timeout: Duration) -> Option<Vec<u8>> {
    let s = if server.is_ipv6() {
        UdpSocket::bind("[::1]:0").expect("bind client socket")
    } else {
        udp_client(timeout)
    };
    s.send_to(packet, server).ok()?;
    recv_reply(&s, timeout)
}

/// The next datagram on `s` within `timeout`.
pub fn recv_reply(s: &UdpSocket, timeout: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 65536];
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .ok()?;
        match s.recv(&mut buf) {
            Ok(n) => return Some(buf[..n].to_vec()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        }
    }
}

/// A TCP connection to `server` with read/write timeouts.
pub fn tcp_connect(server: SocketAddr, timeout: Duration) -> TcpStream {
    let s = TcpStream::connect_timeout(&server, timeout).expect("connect");
    s.set_read_timeout(Some(timeout)).expect("read timeout");
    s.set_write_timeout(Some(timeout)).expect("write timeout");
    s.set_nodelay(true).expect("nodelay");
    s
}

/// Writes one length-prefixed message.
pub fn tcp_send(s: &mut TcpStream, packet: &[u8]) -> std::io::Result<()> {
    let mut framed = (packet.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(packet);
    s.write_all(&framed)
}

/// Reads one length-prefixed message (None on timeout, EOF or error).
pub fn tcp_recv(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len).ok()?;
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut msg).ok()?;
    Some(msg)
}

/// One query over a fresh TCP connection.
pub fn tcp_exchange(server: SocketAddr, packet: &[u8], timeout: Duration) -> Option<Vec<u8>> {
    let mut s = tcp_connect(server, timeout);
    tcp_send(&mut s, packet).ok()?;
    tcp_recv(&mut s)
}

/// Whether the peer closed the connection (EOF or reset) within `timeout`.
pub fn tcp_closed(s: &mut TcpStream, timeout: Duration) -> bool {
    s.set_read_timeout(Some(timeout)).expect("read timeout");
    let mut buf = [0u8; 512];
    let deadline = Instant::now() + timeout;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
        if Instant::now() >= deadline {
            return false;
        }
    }
}

/// Parses a DNS message, panicking with the bytes on failure.
pub fn parse(bytes: &[u8]) -> Message {
    Message::from_vec(bytes).unwrap_or_else(|e| panic!("unparsable reply {bytes:02x?}: {e}"))
}

/// The rcode in a raw reply's header (low 4 bits of byte 3).
pub fn rcode(bytes: &[u8]) -> u8 {
    bytes[3] & 0x0f
}

/// Rcode numbers.
pub mod rcode {
    /// NOERROR.
    pub const NOERROR: u8 = 0;
    /// FORMERR.
    pub const FORMERR: u8 = 1;
    /// SERVFAIL.
    pub const SERVFAIL: u8 = 2;
    /// NXDOMAIN.
    pub const NXDOMAIN: u8 = 3;
    /// REFUSED.
    pub const REFUSED: u8 = 5;
}

/// The A/AAAA addresses of the answer section, as text.
pub fn addresses(msg: &Message) -> Vec<String> {
    msg.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// dig

/// One resource record line of dig's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rr {
    /// Owner name as printed (case kept).
    pub owner: String,
    /// TTL.
    pub ttl: u32,
    /// Type (`A`, `CNAME`, ...).
    pub rtype: String,
    /// Data as printed.
    pub rdata: String,
}

/// What `dig` printed, parsed.
#[derive(Debug, Clone)]
pub struct DigResult {
    /// `status:` of the header (`NOERROR`, `REFUSED`, ...), empty when no answer came.
    pub status: String,
    /// Header flags (`qr`, `rd`, `ra`, `tc`, ...).
    pub flags: Vec<String>,
    /// The question line's name as printed.
    pub question: String,
    /// The answer section.
    pub answers: Vec<Rr>,
    /// Whether an OPT pseudosection was printed.
    pub edns: bool,
    /// dig's whole output.
    pub output: String,
}

impl DigResult {
    /// The rdata of the answer records of a type.
    pub fn rdata(&self, rtype: &str) -> Vec<String> {
        self.answers
            .iter()
            .filter(|r| r.rtype == rtype)
            .map(|r| r.rdata.clone())
            .collect()
    }
}

/// Runs `dig @IP -p PORT +time=2 +tries=1 ARGS...` and parses its output.
pub fn dig(server: SocketAddr, args: &[&str]) -> DigResult {
    let out = Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .arg("-p")
        .arg(server.port().to_string())
        .args(["+time=2", "+tries=1", "+nocookie"])
        .args(args)
        .output()
        .expect("run dig");
    let output = String::from_utf8_lossy(&out.stdout).into_owned();
    parse_dig(&output)
}

/// Parses dig's default output.
pub fn parse_dig(output: &str) -> DigResult {
    let mut result = DigResult {
        status: String::new(),
        flags: Vec::new(),
        question: String::new(),
        answers: Vec::new(),
        edns: false,
        output: output.to_owned(),
    };
    let mut section = "";
    for line in output.lines() {
        if let Some(rest) = line.strip_prefix(";; ->>HEADER<<-") {
            result.status = rest
                .split(',')
                .find_map(|p| p.trim().strip_prefix("status: "))
                .unwrap_or_default()
                .to_owned();
            // A retry (TC then TCP) prints a second header: the last one wins.
            result.answers.clear();
            continue;
        }
        if let Some(rest) = line.strip_prefix(";; flags:") {
            let flags = rest.split(';').next().unwrap_or_default();
            result.flags = flags.split_whitespace().map(str::to_owned).collect();
            continue;
        }
        if line.starts_with(";; OPT PSEUDOSECTION") {
            result.edns = true;
        }
        if let Some(s) = line
            .strip_prefix(";; ")
            .and_then(|l| l.strip_suffix(" SECTION:"))
        {
            section = if s == "ANSWER" { "answer" } else { "" };
            if s == "QUESTION" {
                section = "question";
            }
            continue;
        }
        if line.trim().is_empty() {
            section = "";
            continue;
        }
        match section {
            "question" => {
                if let Some(q) = line.strip_prefix(';') {
                    result.question = q.split_whitespace().next().unwrap_or_default().to_owned();
                }
            }
            "answer" => {
                let mut f = line.split_whitespace();
                let (Some(owner), Some(ttl), Some(_class), Some(rtype)) =
                    (f.next(), f.next(), f.next(), f.next())
                else {
                    continue;
                };
                result.answers.push(Rr {
                    owner: owner.to_owned(),
                    ttl: ttl.parse().unwrap_or_default(),
                    rtype: rtype.to_owned(),
                    rdata: f.collect::<Vec<_>>().join(" "),
                });
            }
            _ => {}
        }
    }
    result
}

// ---------------------------------------------------------------------------------------------
// Metrics

/// `GET path` over HTTP/1.0, retried for up to 5 s while the listener comes up.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match http_get_once(addr, path) {
            Ok(body) => return Ok(body),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// One `GET` (no retry): the body of a 200 answer.
pub fn http_get_once(addr: SocketAddr, path: &str) -> Result<String, String> {
    match http_get_status(addr, path)? {
        (200, body) => Ok(body),
        (code, _) => Err(format!("HTTP status: {code}")),
    }
}

/// One `GET` (no retry): the status code and the body, whatever the status.
pub fn http_get_status(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP header end")?;
    let code = head
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| {
            format!(
                "no HTTP status: {}",
                head.lines().next().unwrap_or_default()
            )
        })?;
    Ok((code, body.to_owned()))
}

/// The samples of metric `name` in a Prometheus text page: (labels, value).
pub fn metric_values(text: &str, name: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (labels, value) = if let Some(r) = rest.strip_prefix('{') {
                let (labels, value) = r.split_once('}')?;
                (labels.to_owned(), value)
            } else if rest.starts_with(' ') {
                (String::new(), rest)
            } else {
                return None;
            };
            Some((labels, value.trim().parse().ok()?))
        })
        .collect()
}
