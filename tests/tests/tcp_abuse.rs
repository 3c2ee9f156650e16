//! Issue 11 item 2 / issue 13 item 2 acceptance: idle TCP connections from other addresses
//! cannot lock a legitimate TCP client out (per-source quota, eviction at the global limit),
//! and a frame trickled byte by byte does not keep a connection alive.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dnsfence_tests::dns::{self, TYPE_A, rcode};
use dnsfence_tests::upstream::{FakeMode, FakeUpstream};
use dnsfence_tests::{Agent, AgentConfig, IoBackend, both_backends, poll_until};

const T: Duration = Duration::from_secs(3);
/// The idle connections of the attack.
const IDLE: usize = 2048;

both_backends! {
    idle_connections_from_ten_addresses_leave_tcp_answered => from_ten_addresses,
    idle_connections_past_the_limit_evict_the_idle_longest => from_many_addresses,
    trickled_frame_is_closed_at_the_idle_timeout => trickle,
    reconnecting_flood_leaves_tcp_answered => reconnecting_flood,
    out_of_descriptors_the_shard_neither_spins_nor_stops_serving => out_of_descriptors,
}

/// CPU seconds (user + system) process `pid` has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name (which may hold spaces): state is the first.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// Review finding (fixed): a process out of file descriptors could not accept, the pending
/// connection kept the listener ready, and the shard spun at 100 % of its CPU. Now each such
/// accept closes the client connection longest without progress (or refuses the new one) and
/// the agent keeps answering; it also says when the open-files limit is below what its shards
/// may hold.
fn out_of_descriptors(io: IoBackend) {
    let fake = FakeUpstream::start(FakeMode::Answer);
    let mut config = AgentConfig::new(io, fake.addr);
    config.wrapper = ["prlimit", "--nofile=160:160", "--"]
        .map(str::to_owned)
        .to_vec();
    let agent = Agent::start(&config);
    let stderr = agent.process.stderr();
    assert!(stderr.contains("the open-files limit is 160"), "{stderr}");
    // 400 idle connections from 8 addresses (50 each, under the per-source quota, and under
    // --max-tcp-conns): the descriptors run out first.
    let conns: Vec<TcpStream> = (0..400)
        .filter_map(|i| connect_from([127, 0, 0, 2 + (i % 8) as u8], agent.addr))
        .collect();
    assert!(conns.len() >= 380, "only {} connected", conns.len());
    // (Nothing here asks the agent's /metrics while its descriptors are exhausted: its HTTP
    // listener cannot accept either.)
    std::thread::sleep(Duration::from_secs(1));
    let before = cpu_seconds(agent.process.pid());
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_seconds(agent.process.pid()) - before;
    assert!(
        used < 0.3,
        "{io:?}: {used} CPU-s in 1 s with descriptors exhausted"
    );
    // UDP needs no new descriptor: answered throughout.
    let q = dns::query(0x2000, "www.allowed.test", TYPE_A, None);
    let reply = dns::udp_exchange(agent.addr, &q, T).expect("UDP answered");
    assert_eq!(dns::rcode(&reply), rcode::NOERROR);
    drop(conns);
    let short = poll_until(Duration::from_secs(10), || {
        let text = dns::http_get_once(agent.metrics, "/metrics").ok()?;
        Some(
            dns::metric_values(&text, "dnsfence_io_tcp_no_descriptor_total")
                .iter()
                .map(|(_, v)| v)
                .sum::<f64>(),
        )
    });
    assert!(
        short > Some(0.0),
        "the agent never ran out of descriptors: {short:?}"
    );
    legit_tcp_answered(&agent);
}

/// A TCP connection from `source` (a loopback address) to the agent, or None if the connect
/// fails (the agent may close extra connections at once; that is not a failure here).
fn connect_from(source: [u8; 4], to: SocketAddr) -> Option<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
    s.bind(&SocketAddr::from((source, 0)).into()).ok()?;
    s.connect_timeout(&to.into(), T).ok()?;
    Some(s.into())
}

/// Opens `IDLE` connections spread over `sources` addresses from 127.0.0.2 up, and waits
/// until the agent has taken each of them (accepted or closed at once).
fn idle_flood(agent: &Agent, sources: u8) -> Vec<TcpStream> {
    let start = Instant::now();
    let conns: Vec<TcpStream> = (0..IDLE)
        .filter_map(|i| {
            connect_from(
                [127, 0, 0, 2 + (i % usize::from(sources)) as u8],
                agent.addr,
            )
        })
        .collect();
    eprintln!(
        "{} idle connections opened in {:?}",
        conns.len(),
        start.elapsed()
    );
    assert!(
        conns.len() * 100 >= IDLE * 95,
        "only {} connected",
        conns.len()
    );
    let taken = poll_until(Duration::from_secs(10), || {
        let n = agent.metric_sum("dnsfence_io_tcp_accepted_total")
            + agent.metric_sum("dnsfence_io_tcp_source_limit_rejected_total")
            + agent.metric_sum("dnsfence_io_tcp_limit_rejected_total");
        (n >= conns.len() as f64).then_some(n)
    });
    assert!(
        taken.is_some(),
        "the agent did not take all {} connections",
        conns.len()
    );
    conns
}

/// A legitimate client (127.0.0.1, a known endpoint) asks over a fresh TCP connection.
fn legit_tcp_answered(agent: &Agent) {
    for id in 0..5u16 {
        let q = dns::query(0x1000 + id, "www.allowed.test", TYPE_A, None);
        let reply = dns::tcp_exchange(agent.addr, &q, T)
            .unwrap_or_else(|| panic!("legitimate TCP query {id} not answered"));
        assert_eq!(dns::rcode(&reply), rcode::NOERROR, "query {id}");
        assert_eq!(&reply[..2], &(0x1000 + id).to_be_bytes());
    }
}

fn from_ten_addresses(io: IoBackend) {
    // 2,048 idle connections from 10 addresses: the per-source quota (64 per shard) keeps
    // them at 640, below the 1,024 connection limit.
    let fake = FakeUpstream::start(FakeMode::Answer);
    let agent = Agent::start(&AgentConfig::new(io, fake.addr));
    let _idle = idle_flood(&agent, 10);
    legit_tcp_answered(&agent);
    let rejected = agent.metric_sum("dnsfence_io_tcp_source_limit_rejected_total");
    assert!(
        rejected >= (IDLE - 640) as f64 * 0.95,
        "{rejected} rejected by the quota"
    );
    assert_eq!(agent.metric_sum("dnsfence_io_tcp_evicted_total"), 0.0);
}

fn from_many_addresses(io: IoBackend) {
    // 2,048 idle connections from 32 addresses, 64 each: within the per-source quota, twice
    // the connection limit. Each new one over the limit evicts the one idle longest.
    let fake = FakeUpstream::start(FakeMode::Answer);
    let agent = Agent::start(&AgentConfig::new(io, fake.addr));
    let _idle = idle_flood(&agent, 32);
    legit_tcp_answered(&agent);
    let evicted = agent.metric_sum("dnsfence_io_tcp_evicted_total");
    assert!(evicted >= 1024.0 * 0.95, "{evicted} evicted");
    assert_eq!(
        agent.metric_sum("dnsfence_io_tcp_source_limit_rejected_total"),
        0.0
    );
    // An attacker address also gets an answer (REFUSED: not a known endpoint), over TCP.
    let mut s = connect_from([127, 0, 0, 2], agent.addr).expect("connect");
    s.set_read_timeout(Some(T)).expect("timeout");
    dns::tcp_send(&mut s, &dns::query(9, "www.allowed.test", TYPE_A, None)).expect("send");
    let reply = dns::tcp_recv(&mut s).expect("answer to an unknown source");
    assert_eq!(dns::rcode(&reply), rcode::REFUSED);
}

fn trickle(io: IoBackend) {
    let fake = FakeUpstream::start(FakeMode::Answer);
    let agent = Agent::start(&AgentConfig::new(io, fake.addr).args(&["--tcp-idle-timeout", "1s"]));
    let mut s = dns::tcp_connect(agent.addr, T);
    // A frame of 300 bytes, one byte every 100 ms: 30 s to complete, if it were allowed to.
    s.write_all(&[0x01]).expect("write");
    let start = Instant::now();
    let mut sent = 1;
    let closed = loop {
        std::thread::sleep(Duration::from_millis(100));
        if s.write_all(&[0]).is_err() {
            break true;
        }
        sent += 1;
        if start.elapsed() > Duration::from_secs(4) {
            break dns::tcp_closed(&mut s, Duration::from_millis(10));
        }
        if dns::tcp_closed(&mut s, Duration::from_millis(1)) {
            break true;
        }
    };
    let took = start.elapsed();
    eprintln!("{io:?}: closed={closed} after {took:?}, {sent} bytes trickled");
    assert!(closed, "trickling connection still open after {took:?}");
    assert!(
        took < Duration::from_millis(2500),
        "closed only after {took:?}"
    );
    assert!(
        sent >= 8,
        "closed after {sent} bytes, before the idle timeout"
    );
    let idle = poll_until(T, || {
        let n = agent.metric_sum("dnsfence_io_tcp_idle_closed_total");
        (n >= 1.0).then_some(n)
    });
    assert_eq!(idle, Some(1.0), "dnsfence_io_tcp_idle_closed_total");
}

/// One query over a fresh connection, as a resolver would ask it: the connect may take a SYN
/// retransmission (1 s) when the flood fills the listen backlog for a moment; the answer must
/// come within 1 s of the query. A connect that fails counts as unanswered.
fn legitimate_exchange(to: std::net::SocketAddr, query: &[u8]) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&to, Duration::from_secs(3)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
    dns::tcp_send(&mut s, query).is_ok()
        && dns::tcp_recv(&mut s).is_some_and(|r| dns::rcode(&r) == rcode::NOERROR)
}

fn reconnecting_flood(io: IoBackend) {
    // An attacker on 32 addresses that keeps opening connections (64 per address, its oldest
    // dropped as it opens more): past the limit every new one evicts another. For 3 s a
    // legitimate client asks over a fresh connection every 50 ms.
    let fake = FakeUpstream::start(FakeMode::Answer);
    let agent = Agent::start(&AgentConfig::new(io, fake.addr));
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicUsize::new(0));
    let attacker = {
        let (stop, opened, to) = (stop.clone(), opened.clone(), agent.addr);
        std::thread::spawn(move || {
            let mut open: Vec<std::collections::VecDeque<TcpStream>> =
                (0..32).map(|_| Default::default()).collect();
            let deadline = Instant::now() + Duration::from_secs(10);
            for i in 0..200_000 {
                if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                let a = i % 32;
                if open[a].len() >= 64 {
                    open[a].pop_front();
                }
                if let Some(s) = connect_from([127, 0, 0, 2 + a as u8], to) {
                    open[a].push_back(s);
                    opened.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let start = Instant::now();
    let (mut asked, mut answered) = (0u32, 0u32);
    // Let the attacker fill the table first.
    while opened.load(Ordering::Relaxed) < 1024 && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let flood_start = Instant::now();
    while flood_start.elapsed() < Duration::from_secs(3) {
        asked += 1;
        let q = dns::query(asked as u16, "www.allowed.test", TYPE_A, None);
        if legitimate_exchange(agent.addr, &q) {
            answered += 1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let during = opened.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    attacker.join().expect("attacker thread");
    let evicted = agent.metric_sum("dnsfence_io_tcp_evicted_total");
    eprintln!(
        "{io:?}: {answered} of {asked} legitimate TCP queries answered; attacker opened {during} \
         connections, {evicted} evicted"
    );
    assert!(
        during >= 2048,
        "the attacker opened only {during} connections"
    );
    assert!(
        answered * 100 >= asked * 95,
        "{answered} of {asked} legitimate TCP queries answered"
    );
    assert!(evicted > 0.0);
}
