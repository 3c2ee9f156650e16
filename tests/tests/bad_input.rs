//! Issue #3 acceptance, bad input over real sockets: short datagrams, malformed queries,
//! lying TCP frames, and a flood of unique names; the agent must keep serving throughout.

use std::io::Write;
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use dnsfence_tests::dns::{self, TYPE_A, rcode};
use dnsfence_tests::upstream::{Bundled, FakeMode, FakeUpstream};
use dnsfence_tests::{Agent, AgentConfig, IoBackend, TempDir, both_backends, loadgen, poll_until};

const T: Duration = Duration::from_secs(3);

both_backends! {
    short_datagrams_dropped_agent_keeps_serving => short_datagrams,
    malformed_queries_get_formerr => formerr,
    lying_tcp_frames_close_the_connection => lying_tcp_frames,
    query_followed_by_a_bad_frame_is_answered_then_closed => query_then_bad_frame,
    garbage_64k_frames_get_formerr_or_close => garbage_64k_frames,
    unique_name_flood_keeps_memory_bounded => unique_name_flood,
}

/// The agent answers a normal query (allowed: NOERROR over UDP and TCP).
fn still_serving(addr: SocketAddr) {
    let q = dns::query(0x600d, "www.allowed.test", TYPE_A, None);
    let udp = dns::udp_exchange(addr, &q, T).expect("UDP answer");
    assert_eq!(dns::rcode(&udp), rcode::NOERROR);
    let tcp = dns::tcp_exchange(addr, &q, T).expect("TCP answer");
    assert_eq!(dns::rcode(&tcp), rcode::NOERROR);
}

fn short_datagrams(io: IoBackend) {
    let fake = FakeUpstream::start(FakeMode::Answer);
    let agent = Agent::start(&AgentConfig::new(io, fake.addr));
    let s = dns::udp_client(T);
    let q = dns::query(0x1234, "www.allowed.test", TYPE_A, None);
    let bad: [&[u8]; 3] = [&[], &[0x12], &q[..11]];
    for packet in bad {
        s.send_to(packet, agent.addr).expect("send");
        let reply = dns::recv_reply(&s, Duration::from_millis(300));
        assert!(reply.is_none(), "reply to a {}-byte datagram", packet.len());
    }
    // A response (QR set) is never answered: answering would let two servers on one port, or
    // a spoofed source, bounce packets forever.
    let mut response = q.clone();
    response[2] |= 0x80;
    s.send_to(&response, agent.addr).expect("send");
    assert!(
        dns::recv_reply(&s, Duration::from_millis(300)).is_none(),
        "reply to a response"
    );
    // The next query on the same socket is answered.
    s.send_to(&q, agent.addr).expect("send");
    let reply = dns::recv_reply(&s, T).expect("answer after the short datagrams");
    assert_eq!(&reply[..2], &[0x12, 0x34]);
    assert_eq!(dns::rcode(&reply), rcode::NOERROR);
    let dropped = poll_until(T, || {
        let n = agent.metric_sum("dnsfence_malformed_dropped_total");
        (n >= 3.0).then_some(n)
    });
    assert_eq!(dropped, Some(3.0), "dnsfence_malformed_dropped_total");
    let responses = poll_until(T, || {
        let n = agent.metric_sum("dnsfence_responses_dropped_total");
        (n >= 1.0).then_some(n)
    });
    assert_eq!(responses, Some(1.0), "dnsfence_responses_dropped_total");
    assert_eq!(fake.names(), ["www.allowed.test"]);
    still_serving(agent.addr);
}

/// Malformed queries with a readable header, and the rcode each must get.
fn malformed() -> Vec<(&'static str, Vec<u8>, u8)> {
    let good = dns::query(0x4242, "www.allowed.test", TYPE_A, None);
    let mut two_questions = good.clone();
    two_questions[5] = 2;
    two_questions.extend_from_slice(&good[12..]);
    let mut no_question = good.clone();
    no_question[5] = 0;
    // The question name is a compression pointer to itself.
    let mut pointer_loop = good[..12].to_vec();
    pointer_loop.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
    // A pointer chain that loops through two pointers.
    let mut pointer_loop2 = good[..12].to_vec();
    pointer_loop2.extend_from_slice(&[0xc0, 0x0e, 0xc0, 0x0c, 0, 1, 0, 1]);
    let mut label_too_long = good[..12].to_vec();
    label_too_long.push(64);
    label_too_long.extend_from_slice(&[b'a'; 64]);
    label_too_long.extend_from_slice(&[0, 0, 1, 0, 1]);
    let truncated_question = good[..good.len() - 3].to_vec();
    let mut opcode = good.clone();
    opcode[2] |= 2 << 3; // STATUS
    vec![
        ("QDCOUNT=2", two_questions, rcode::FORMERR),
        ("QDCOUNT=0", no_question, rcode::FORMERR),
        ("compression loop", pointer_loop, rcode::FORMERR),
        (
            "compression loop via two pointers",
            pointer_loop2,
            rcode::FORMERR,
        ),
        ("label of 64", label_too_long, rcode::FORMERR),
        ("question cut short", truncated_question, rcode::FORMERR),
        ("opcode STATUS", opcode, 4), // NOTIMP
    ]
}

fn formerr(io: IoBackend) {
    let fake = FakeUpstream::start(FakeMode::Answer);
    let agent = Agent::start(&AgentConfig::new(io, fake.addr));
    let cases = malformed();
    for (what, packet, want) in &cases {
        let reply = dns::udp_exchange(agent.addr, packet, T)
            .unwrap_or_else(|| panic!("{what}: no reply over UDP"));
        assert_eq!(&reply[..2], &[0x42, 0x42], "{what}: ID kept");
        assert_eq!(dns::rcode(&reply), *want, "{what}: rcode over UDP");
        assert_ne!(reply[2] & 0x80, 0, "{what}: QR set");
    }
    // Over one TCP connection, one after the other: each answered, the connection stays up.
    let mut conn = dns::tcp_connect(agent.addr, T);
    for (what, packet, want) in &cases {
        dns::tcp_send(&mut conn, packet).expect("send");
        let reply = dns::tcp_recv(&mut conn).unwrap_or_else(|| panic!("{what}: no TCP reply"));
        assert_eq!(dns::rcode(&reply), *want, "{what}: rcode over TCP");
    }
    let good = dns::query(7, "www.allowed.test", TYPE_A, None);
    dns::tcp_send(&mut conn, &good).expect("send");
    let reply = dns::tcp_recv(&mut conn).expect("answer on the same connection");
    assert_eq!(dns::rcode(&reply), rcode::NOERROR);
    // Nothing malformed went upstream.
    assert_eq!(fake.names(), ["www.allowed.test"]);
    let answered = poll_until(T, || {
        let n = agent.metric_sum("dnsfence_malformed_answered_total");
        (n >= (2 * cases.len()) as f64).then_some(n)
    });
    assert_eq!(answered, Some((2 * cases.len()) as f64));
}

fn lying_tcp_frames(io: IoBackend) {
    let fake = FakeUpstream::start(FakeMode::Answer);
    let agent = Agent::start(&AgentConfig::new(io, fake.addr).args(&["--tcp-idle-timeout", "1s"]));
    let q = dns::query(0x7777, "www.allowed.test", TYPE_A, None);

    // Claims 300 bytes, sends 20, then stops: closed by the idle timeout.
    let mut stalled = dns::tcp_connect(agent.addr, T);
    stalled.write_all(&[0x01, 0x2c]).expect("write");
    stalled.write_all(&q[..20]).expect("write");
    // Claims fewer bytes than the query has: the cut message is FORMERR (or dropped), the
    // rest is read as the next frame's length and never completes.
    let mut short = dns::tcp_connect(agent.addr, T);
    let mut framed = ((q.len() - 6) as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    short.write_all(&framed).expect("write");
    // A zero-length frame, then silence.
    let mut empty = dns::tcp_connect(agent.addr, T);
    empty.write_all(&[0, 0]).expect("write");
    // Stops mid-frame and closes its side: the agent closes at once, without the timeout.
    let mut half = dns::tcp_connect(agent.addr, T);
    half.write_all(&(q.len() as u16).to_be_bytes())
        .expect("write");
    half.write_all(&q[..q.len() / 2]).expect("write");
    half.shutdown(Shutdown::Write).expect("shutdown");
    let start = Instant::now();
    assert!(
        dns::tcp_closed(&mut half, Duration::from_millis(900)),
        "half-closed mid-frame"
    );
    assert!(start.elapsed() < Duration::from_millis(900));

    // Meanwhile everyone else is served.
    still_serving(agent.addr);
    for (what, conn) in [
        ("stalled mid-frame", &mut stalled),
        ("short length", &mut short),
        ("zero length", &mut empty),
    ] {
        assert!(
            dns::tcp_closed(conn, Duration::from_secs(4)),
            "{what}: connection still open after the 1 s idle timeout"
        );
    }
    still_serving(agent.addr);
    assert!(fake.names().iter().all(|n| n == "www.allowed.test"));
}

/// A valid query and, in the same segment, a frame that cannot be a query (shorter than a DNS
/// header, or a response): the query is answered, then the connection is closed (issue 13
/// item 5: before, the close came first and the answer was lost).
fn query_then_bad_frame(io: IoBackend) {
    let fake = FakeUpstream::start(FakeMode::Answer);
    let agent = Agent::start(&AgentConfig::new(io, fake.addr));
    let mut response = dns::query(0x0bad, "www.allowed.test", TYPE_A, None);
    response[2] |= 0x80;
    let mut cases: Vec<(String, Vec<u8>)> = [0u16, 1, 5]
        .into_iter()
        .map(|len| {
            let mut bad = len.to_be_bytes().to_vec();
            bad.resize(2 + usize::from(len), 0);
            (format!("frame of length {len}"), bad)
        })
        .collect();
    let mut framed_response = (response.len() as u16).to_be_bytes().to_vec();
    framed_response.extend_from_slice(&response);
    cases.push(("response frame (QR set)".into(), framed_response));
    for (i, (what, bad)) in cases.iter().enumerate() {
        for name in ["www.allowed.test", "denied.example"] {
            let id = 0x5100 + i as u16;
            let q = dns::query(id, name, TYPE_A, None);
            let mut segment = (q.len() as u16).to_be_bytes().to_vec();
            segment.extend_from_slice(&q);
            segment.extend_from_slice(bad);
            let mut conn = dns::tcp_connect(agent.addr, T);
            conn.write_all(&segment).expect("write");
            let reply = dns::tcp_recv(&mut conn)
                .unwrap_or_else(|| panic!("{name} followed by a {what}: no answer"));
            assert_eq!(&reply[..2], &id.to_be_bytes(), "{what}");
            let want = if name == "denied.example" {
                rcode::REFUSED
            } else {
                rcode::NOERROR
            };
            assert_eq!(dns::rcode(&reply), want, "{name} followed by a {what}");
            assert!(
                dns::tcp_closed(&mut conn, Duration::from_secs(2)),
                "{what}: connection left open"
            );
        }
    }
    still_serving(agent.addr);
}

/// 64 KB frames of garbage: with QR set (a "response") the connection is closed at once; with
/// a readable query header (QR clear, QDCOUNT 0) the answer is FORMERR and the connection stays.
fn garbage_64k_frames(io: IoBackend) {
    let fake = FakeUpstream::start(FakeMode::Answer);
    let agent = Agent::start(&AgentConfig::new(io, fake.addr));
    let mut conn = dns::tcp_connect(agent.addr, T);
    dns::tcp_send(&mut conn, &vec![0xff; 65535]).expect("send");
    let start = Instant::now();
    assert!(
        dns::tcp_closed(&mut conn, Duration::from_secs(2)),
        "64 KB of 0xff: connection left open"
    );
    assert!(start.elapsed() < Duration::from_secs(2));

    let mut conn = dns::tcp_connect(agent.addr, T);
    let mut garbage: Vec<u8> = (0..65535u32).map(|i| (i * 7 + 3) as u8).collect();
    garbage[..12].copy_from_slice(&[0x12, 0x34, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    dns::tcp_send(&mut conn, &garbage).expect("send");
    let reply = dns::tcp_recv(&mut conn).expect("FORMERR for a 64 KB frame with a header");
    assert_eq!(&reply[..2], &[0x12, 0x34]);
    assert_eq!(dns::rcode(&reply), rcode::FORMERR);
    let q = dns::query(0x600d, "www.allowed.test", TYPE_A, None);
    dns::tcp_send(&mut conn, &q).expect("send");
    let reply = dns::tcp_recv(&mut conn).expect("answer on the same connection");
    assert_eq!(dns::rcode(&reply), rcode::NOERROR);
    let framing = poll_until(T, || {
        let n = agent.metric_sum("dnsfence_io_tcp_framing_errors_total");
        (n >= 1.0).then_some(n)
    });
    assert_eq!(framing, Some(1.0), "dnsfence_io_tcp_framing_errors_total");
}

/// RSS growth allowed for the flood, and for its replay, in KiB.
const FLOOD_RSS_KIB: u64 = 12 * 1024;
const FLOOD_REPLAY_RSS_KIB: u64 = 6 * 1024;

/// The caps of the flood run: small, so that 20k unique names exceed every one of them.
const FLOOD_CACHE: usize = 1000;
const FLOOD_ALLOW_PER_ENDPOINT: usize = 2000;
const FLOOD_ALLOW_ENTRIES: usize = 4000;
const FLOOD_MAX_PENDING: usize = 128;

/// A flood of unique allowed names (each matches the policy's toFQDNs rule, so each answer
/// wants an allow entry) against an agent with small caps: the FQDN cache, the endpoint's
/// allow quota and the pending table are each exceeded (the upstream holds answers 20 ms, so
/// 10k qps keeps about 200 queries in flight), which the metrics show; memory stays within a
/// tight bound, and replaying the same names adds nothing.
fn unique_name_flood(io: IoBackend) {
    const NAMES: usize = 20_000;
    let up = Bundled::start(&["--prefix4", "198.18.0.0/15", "--delay-ms", "20"]);
    let caps = [
        ("--fqdn-cache-entries", FLOOD_CACHE),
        ("--max-allow-per-endpoint", FLOOD_ALLOW_PER_ENDPOINT),
        ("--allow-entries", FLOOD_ALLOW_ENTRIES),
        ("--max-pending", FLOOD_MAX_PENDING),
    ];
    let args: Vec<String> = caps
        .iter()
        .flat_map(|(flag, n)| [flag.to_string(), n.to_string()])
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = Agent::start(&AgentConfig::new(io, up.addr).args(&args));
    let dir = TempDir::new("flood");
    let warm: String = (0..500)
        .map(|i| format!("warm-{i}.allowed.test A\n"))
        .collect();
    let flood: String = (0..NAMES)
        .map(|i| format!("u{i}-{:x}.allowed.test A\n", fastrand::u64(..)))
        .collect();
    let warm = dir.write("warm.txt", &warm);
    let flood = dir.write("flood.txt", &flood);
    let run = |file: &std::path::Path, rate: u64, secs: f64| loadgen(agent.addr, file, rate, secs);
    run(&warm, 1000, 0.5);
    let before = agent.process.rss_kib();
    let report = run(&flood, 10_000, 2.0);
    let after = agent.process.rss_kib();
    let sent = report["sent"].as_u64().unwrap_or(0);
    let answered = report["answered"].as_u64().unwrap_or(0);
    let noerror = report["rcodes"]["NOERROR"].as_u64().unwrap_or(0);
    let servfail = report["rcodes"]["SERVFAIL"].as_u64().unwrap_or(0);
    eprintln!(
        "{io:?}: {sent} unique names sent, {answered} answered ({noerror} NOERROR, {servfail} SERVFAIL), RSS {before} -> {after} KiB"
    );
    assert!(sent as usize >= NAMES, "sent {sent}");
    assert!(answered * 100 >= sent * 95, "answered {answered} of {sent}");

    // Every cap was reached, and none exceeded.
    let metric = |name: &str| agent.metric_sum(name);
    let cache = metric("dnsfence_fqdn_cache_entries");
    let evictions = metric("dnsfence_fqdn_cache_evictions_total");
    let entries = metric("dnsfence_allow_entries");
    let quota = metric("dnsfence_allow_refused_total{reason=\"endpoint_quota\"}");
    let pending_full = metric("dnsfence_pending_full_total");
    eprintln!(
        "{io:?}: FQDN cache {cache} entries, {evictions} evicted; {entries} allow entries, \
         {quota} refused by the endpoint quota; {pending_full} SERVFAIL for a full pending table"
    );
    assert!(
        cache <= FLOOD_CACHE as f64,
        "FQDN cache over its cap: {cache}"
    );
    assert!(
        evictions >= FLOOD_CACHE as f64,
        "the FQDN cache (cap {FLOOD_CACHE}) was not overrun: {evictions} evictions"
    );
    assert_eq!(
        entries, FLOOD_ALLOW_PER_ENDPOINT as f64,
        "allow entries: the endpoint's quota must be full and not exceeded"
    );
    assert!(
        quota >= 1000.0,
        "the allow quota refused only {quota} answers"
    );
    assert!(
        pending_full >= 100.0,
        "the pending table (cap {FLOOD_MAX_PENDING}) overflowed only {pending_full} times"
    );
    assert!(
        noerror > 0 && servfail > 0,
        "{noerror} NOERROR, {servfail} SERVFAIL"
    );
    assert!(
        after < before + FLOOD_RSS_KIB,
        "RSS grew from {before} KiB to {after} KiB for {NAMES} unique names"
    );
    // The same names again: nothing new to remember, so no growth beyond noise (no per-query
    // leak).
    let report = run(&flood, 10_000, 2.0);
    let again = agent.process.rss_kib();
    eprintln!("{io:?}: replay of the same names: RSS {after} -> {again} KiB");
    assert!(report["answered"].as_u64().unwrap_or(0) * 100 >= sent * 95);
    assert_eq!(metric("dnsfence_allow_entries"), entries);
    assert!(
        again < after + FLOOD_REPLAY_RSS_KIB,
        "RSS grew from {after} KiB to {again} KiB replaying {NAMES} known names"
    );
    let mut a = agent;
    a.process.assert_running();
    // Still serving: a name that needs no allow entry (no toFQDNs rule matches it) is
    // answered, over UDP and TCP; one that would need a new entry gets SERVFAIL (quota full).
    let q = dns::query(0x600d, "allowed.test", TYPE_A, None);
    let udp = dns::udp_exchange(a.addr, &q, T).expect("UDP answer");
    assert_eq!(dns::rcode(&udp), rcode::NOERROR);
    let tcp = dns::tcp_exchange(a.addr, &q, T).expect("TCP answer");
    assert_eq!(dns::rcode(&tcp), rcode::NOERROR);
    // (Five names: the upstream answers from 198.18.0.0/15, so a name's address is already
    // allowed, through some flood name's, about 1.5 % of the time; that one needs no entry.)
    let rcodes: Vec<u8> = (0..5u16)
        .map(|i| {
            let q = dns::query(0x600e + i, &format!("new{i}.allowed.test"), TYPE_A, None);
            dns::rcode(&dns::udp_exchange(a.addr, &q, T).expect("UDP answer"))
        })
        .collect();
    let servfail = rcodes.iter().filter(|&&r| r == rcode::SERVFAIL).count();
    assert!(
        servfail >= 3
            && rcodes
                .iter()
                .all(|&r| r == rcode::SERVFAIL || r == rcode::NOERROR),
        "{rcodes:?}"
    );
}
