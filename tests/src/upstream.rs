//! Upstreams for the agent: the bundled `dnsfence-loadgen upstream`, knotd serving a tiny zone,
//! and an in-process fake that records every name it is asked (or ignores everything).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::dns;
use crate::{Process, TempDir, bin, free_addr};

/// A running `dnsfence-loadgen upstream` (UDP and TCP on one port).
#[derive(Debug)]
pub struct Bundled {
    /// The process.
    pub process: Process,
    /// Its address.
    pub addr: SocketAddr,
    _dir: TempDir,
}

impl Bundled {
    /// Starts it on an ephemeral port with extra flags and waits until it answers.
    pub fn start(extra: &[&str]) -> Bundled {
        Bundled::start_on("127.0.0.1:0".parse().expect("address"), extra)
    }

    /// Starts it on `listen` (port 0: any) and waits until it answers.
    pub fn start_on(listen: SocketAddr, extra: &[&str]) -> Bundled {
        let dir = TempDir::new("upstream");
        let mut cmd = Command::new(bin("dnsfence-loadgen"));
        cmd.args(["upstream", "--listen", &listen.to_string()])
            .args(extra);
        let mut process = Process::spawn("loadgen-upstream", cmd, dir.path());
        let mut addr = None;
        let stdout = process.stdout_path().to_path_buf();
        process.wait_ready(Duration::from_secs(10), || {
            addr = process_addr(&std::fs::read_to_string(&stdout).unwrap_or_default());
            addr.is_some()
        });
        let addr = addr.expect("address");
        process.wait_ready(Duration::from_secs(10), || {
            let q = dns::query(1, "ready.probe.test", dns::TYPE_A, None);
            dns::udp_exchange(addr, &q, Duration::from_millis(200)).is_some()
        });
        Bundled {
            process,
            addr,
            _dir: dir,
        }
    }
}

fn process_addr(stdout: &str) -> Option<SocketAddr> {
    stdout
        .lines()
        .next()?
        .strip_prefix("listening on ")?
        .trim()
        .parse()
        .ok()
}

/// The zone knotd serves: the root, with fixed addresses under `allowed.test` and `denied.test`.
pub const KNOT_ZONE: &str = "$TTL 300
.   IN SOA ns. hostmaster. 1 3600 600 86400 300
.   IN NS  ns.
ns. IN A   127.0.0.1
www.allowed.test.   IN A    192.0.2.8
www.allowed.test.   IN AAAA 2001:db8::8
*.allowed.test.     IN A    192.0.2.7
alias.allowed.test. IN CNAME www.allowed.test.
*.denied.test.      IN A    192.0.2.66
";

/// knotd serving [`KNOT_ZONE`] on a free loopback port, with mod-stats counting requests.
#[derive(Debug)]
pub struct Knot {
    /// The process.
    pub process: Process,
    /// Its address.
    pub addr: SocketAddr,
    dir: TempDir,
}

impl Knot {
    /// Starts knotd and waits until it answers the SOA of the root.
    pub fn start() -> Knot {
        let dir = TempDir::new("knot");
        let addr = free_addr();
        let run = dir.path().display().to_string();
        let zone = dir.write("root.zone", KNOT_ZONE);
        std::fs::create_dir_all(dir.path().join("db")).expect("knot db dir");
        let conf = format!(
            r#"server:
    listen: 127.0.0.1@{port}
    rundir: "{run}"
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
control:
    listen: "{run}/knot.sock"
database:
    storage: "{run}/db"
log:
  - target: stderr
    any: warning
mod-stats:
  - id: req
    request-protocol: on
    response-code: on
    server-operation: off
    request-bytes: off
    response-bytes: off
    edns-presence: off
    flag-presence: off
    reply-nodata: off
    query-type: off
    query-size: off
    reply-size: off
template:
  - id: default
    global-module: mod-stats/req
zone:
  - domain: .
    file: "{zone}"
    semantic-checks: off
    journal-content: none
    zonefile-sync: -1
"#,
            port = addr.port(),
            zone = zone.display()
        );
        let conf = dir.write("knot.conf", &conf);
        let mut cmd = Command::new("knotd");
        cmd.arg("-c").arg(&conf);
        let mut process = Process::spawn("knotd", cmd, dir.path());
        process.wait_ready(Duration::from_secs(10), || {
            let q = dns::query(1, ".", 6, None);
            dns::udp_exchange(addr, &q, Duration::from_millis(200)).is_some()
        });
        Knot { process, addr, dir }
    }

    /// `knotc stats` as a map (`mod-stats.request-protocol[udp4]` → count).
    pub fn stats(&self) -> BTreeMap<String, u64> {
        let out = Command::new("knotc")
            .arg("-s")
            .arg(self.dir.path().join("knot.sock"))
            .arg("stats")
            .output()
            .expect("run knotc");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(" = ")?;
                Some((k.trim().to_owned(), v.trim().parse().ok()?))
            })
            .collect()
    }

    /// Requests received, all protocols.
    pub fn requests(&self) -> u64 {
        self.stats()
            .iter()
            .filter(|(k, _)| k.starts_with("mod-stats.request-protocol"))
            .map(|(_, v)| v)
            .sum()
    }
}

/// What the fake upstream does with a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FakeMode {
    /// Answers every query with one A record `192.0.2.53`, TTL 60 (AAAA and others: no data).
    Answer,
    /// Reads every query and never answers.
    Silent,
    /// Answers like `Answer`; names whose first label starts with `slow` this many
    /// milliseconds late (UDP; TCP answers at once).
    Delay(u64),
    /// Answers like `Answer` with the question lowercased (a server that does not preserve
    /// case, which defeats DNS 0x20).
    Lowercase,
}

/// An in-process upstream on UDP and TCP (one port) that records the names it is asked.
/// Its threads stop when it is dropped.
pub struct FakeUpstream {
    /// Its address.
    pub addr: SocketAddr,
    names: Arc<Mutex<Vec<String>>>,
    packets: Arc<Mutex<Vec<Vec<u8>>>>,
    udp: UdpSocket,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl FakeUpstream {
    /// Starts it on an ephemeral loopback port.
    pub fn start(mode: FakeMode) -> FakeUpstream {
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").expect("bind fake upstream");
            let port = udp.local_addr().expect("addr").port();
            if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)) {
                break (udp, tcp);
            }
        };
        FakeUpstream::serve(udp, tcp, mode)
    }

    /// Starts it on `addr` (UDP and TCP), e.g. port 53 of a loopback address (root).
    pub fn start_on(addr: SocketAddr, mode: FakeMode) -> FakeUpstream {
        let udp = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr}/udp: {e}"));
        let tcp = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}/tcp: {e}"));
        FakeUpstream::serve(udp, tcp, mode)
    }

    fn serve(udp: UdpSocket, tcp: TcpListener, mode: FakeMode) -> FakeUpstream {
        let addr = udp.local_addr().expect("addr");
        udp.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        tcp.set_nonblocking(true).expect("nonblocking");
        let names = Arc::new(Mutex::new(Vec::new()));
        let packets = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let udp_clone = udp.try_clone().expect("clone fake upstream socket");
        let udp_thread = {
            let (names, packets, stop) =
                (Arc::clone(&names), Arc::clone(&packets), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let udp = Arc::new(udp);
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, peer)) = udp.recv_from(&mut buf) else {
                        continue;
                    };
                    packets
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(buf[..n].to_vec());
                    let Some(reply) = handle(&buf[..n], mode, &names) else {
                        continue;
                    };
                    let slow = buf
                        .get(13..17)
                        .is_some_and(|l| l.eq_ignore_ascii_case(b"slow"));
                    if let (FakeMode::Delay(ms), true) = (mode, slow) {
                        let udp = Arc::clone(&udp);
                        std::thread::spawn(move || {
                            std::thread::sleep(Duration::from_millis(ms));
                            let _ = udp.send_to(&reply, peer);
                        });
                    } else {
                        let _ = udp.send_to(&reply, peer);
                    }
                }
            })
        };
        let tcp_thread = {
            let (names, stop) = (Arc::clone(&names), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut conns = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((conn, _)) => {
                            let (names, stop) = (Arc::clone(&names), Arc::clone(&stop));
                            conns.push(std::thread::spawn(move || {
                                serve_tcp(conn, mode, &names, &stop)
                            }));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
                for c in conns {
                    let _ = c.join();
                }
            })
        };
        FakeUpstream {
            addr,
            names,
            packets,
            udp: udp_clone,
            stop,
            threads: vec![udp_thread, tcp_thread],
        }
    }

    /// The names asked so far, lowercased, in arrival order.
    pub fn names(&self) -> Vec<String> {
        self.names.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Every UDP datagram received so far, as received.
    pub fn packets(&self) -> Vec<Vec<u8>> {
        self.packets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Its UDP socket: what is sent from it has the upstream's own address and port (the
    /// spoofing test forges answers with it).
    pub fn udp_socket(&self) -> &UdpSocket {
        &self.udp
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn serve_tcp(mut conn: TcpStream, mode: FakeMode, names: &Mutex<Vec<String>>, stop: &AtomicBool) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(50)));
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
        while pending.len() >= 2 {
            let len = usize::from(u16::from_be_bytes([pending[0], pending[1]]));
            if pending.len() < 2 + len {
                break;
            }
            let msg: Vec<u8> = pending.drain(..2 + len).skip(2).collect();
            if let Some(reply) = handle(&msg, mode, names) {
                let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&reply);
                if conn.write_all(&framed).is_err() {
                    return;
                }
            }
        }
    }
}

/// Records the question name and builds the reply (header and question copied, QR/RA set).
fn handle(query: &[u8], mode: FakeMode, names: &Mutex<Vec<String>>) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    let mut pos = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*query.get(pos)?);
        pos += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        labels.push(String::from_utf8_lossy(query.get(pos..pos + len)?).to_lowercase());
        pos += len;
    }
    let qtype = u16::from_be_bytes([*query.get(pos)?, *query.get(pos + 1)?]);
    let question_end = pos + 4;
    query.get(..question_end)?;
    names
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(labels.join("."));
    if mode == FakeMode::Silent {
        return None;
    }
    let mut reply = query[..question_end].to_vec();
    if mode == FakeMode::Lowercase {
        reply[12..].make_ascii_lowercase();
    }
    reply[2] = 0x80 | 0x04 | (query[2] & 0x01); // QR, AA, RD copied
    reply[3] = 0x80; // RA, NOERROR
    reply[6..12].copy_from_slice(&[0, u8::from(qtype == dns::TYPE_A), 0, 0, 0, 0]);
    if qtype == dns::TYPE_A {
        reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 53]);
    }
    Some(reply)
}
