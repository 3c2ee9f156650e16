//! Off-path spoofing of upstream answers (issue 11, item 1), fast failure on ICMP errors
//! (issue 13, item 4) and what goes on the wire (issue 11, item 3), on both I/O backends.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dnsfence_tests::dns::{self, TYPE_A, rcode};
use dnsfence_tests::upstream::{FakeMode, FakeUpstream};
use dnsfence_tests::{
    Agent, AgentConfig, IoBackend, both_backends, free_addr, poll_until, udp_ports_connected_to,
};

both_backends! {
    forged_answers_with_every_id_never_reach_the_client => forged_answers,
    closed_upstream_port_gets_servfail_at_once => closed_upstream_port,
    forwarded_queries_carry_only_a_minimal_opt => forwarded_records,
    upstream_that_does_not_preserve_case_gets_0x20_switched_off => case_fallback,
}

/// The answer an off-path attacker forges for `name`: every field right but the ID it
/// guesses and the letter case it cannot know (it sends the name as the client wrote it).
fn forged_answer(id: u16, name: &str) -> Vec<u8> {
    let mut a = id.to_be_bytes().to_vec();
    a.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]);
    a.extend_from_slice(&dns::name_wire(name));
    a.extend_from_slice(&[0, 1, 0, 1]);
    a.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0x0e, 0x10, 0, 4, 6, 6, 6, 6]);
    a
}

/// While the upstream holds back an allowed name's answer for 4 s, every 16-bit ID is forged
/// (A 6.6.6.6, from the upstream's own address and port) at each of the agent's upstream
/// source ports; the client must get the upstream's address and the allow table must not
/// learn 6.6.6.6. On the code before the fix (0x20 off, four long-lived ports, no reaction to
/// wrong IDs) the client got 6.6.6.6.
fn forged_answers(io: IoBackend) {
    let fake = FakeUpstream::start(FakeMode::Delay(4000));
    let agent = Agent::start(&AgentConfig::new(io, fake.addr).args(&["--upstream-timeout", "20s"]));
    // An agent in service has seen its upstream echo a spelling (a right-ID forgery in the
    // wrong spelling is then a wrong question to sit out, not a sign of a case-blind upstream
    // to fail fast for). Only `slow*` names are held back.
    let warm = dns::query(0x4141, "warm.allowed.test", TYPE_A, None);
    let reply = dns::udp_exchange(agent.addr, &warm, Duration::from_secs(3)).expect("warm-up");
    assert_eq!(dns::rcode(&reply), rcode::NOERROR);
    let name = "slow-target.allowed.test";
    let client = dns::udp_client(Duration::from_secs(15));
    let q = dns::query(0x4242, name, TYPE_A, None);
    client.send_to(&q, agent.addr).expect("send");
    poll_until(Duration::from_secs(3), || {
        fake.names().contains(&name.to_owned()).then_some(())
    })
    .expect("the query reached the upstream");
    let ports = udp_ports_connected_to(agent.process.pid(), fake.addr);
    assert!(!ports.is_empty(), "no upstream sockets found in /proc");

    // The attacker sends from the upstream's own socket: right address, right port.
    let forger = fake.udp_socket();
    let started = Instant::now();
    let mut fired = 0u64;
    let mut targets: Vec<u16> = ports.clone();
    let mut done = HashSet::new();
    // Each port found (including the fresh ones it finds on a second look) gets all 65,536
    // IDs, paced so that the agent's socket buffer keeps up; bounded at 12 ports and 3.5 s.
    while let Some(port) = targets.pop() {
        if !done.insert(port) || done.len() > 12 {
            continue;
        }
        let to = SocketAddr::from(([127, 0, 0, 1], port));
        for id in 0..=u16::MAX {
            // Refused sends (the port was closed under us: ICMP) are fine.
            let _ = forger.send_to(&forged_answer(id, name), to);
            fired += 1;
            if id % 64 == 63 {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        if targets.is_empty() && started.elapsed() < Duration::from_millis(3000) {
            targets = udp_ports_connected_to(agent.process.pid(), fake.addr);
        }
    }
    eprintln!(
        "fired {fired} forged answers at {} ports in {:?}",
        done.len(),
        started.elapsed()
    );
    assert!(fired >= 65_536 * ports.len() as u64);

    let reply = dns::recv_reply(&client, Duration::from_secs(15)).expect("an answer");
    let msg = dns::parse(&reply);
    assert_eq!(dns::rcode(&reply), rcode::NOERROR, "{msg:?}");
    assert_eq!(
        dns::addresses(&msg),
        ["192.0.2.53"],
        "forged address in the answer"
    );
    assert_eq!(&reply[0..2], &[0x42, 0x42]);
    // Only the real address was allowed; the socket under fire was retired early.
    // The warm-up's address and the real one: both 192.0.2.53, one entry.
    assert_eq!(agent.metric_sum("dnsfence_allow_entries"), 1.0);
    let metric_at_least = |name: &str, min: f64| {
        poll_until(Duration::from_secs(2), || {
            (agent.metric_sum(name) >= min).then_some(())
        })
        .unwrap_or_else(|| panic!("{name} below {min}: {}", agent.metric_sum(name)))
    };
    metric_at_least("dnsfence_upstream_sockets_attacked_total", 1.0);
    metric_at_least("dnsfence_upstream_resent_total", 1.0);
    // No second answer (forged or not) follows.
    assert!(dns::recv_reply(&client, Duration::from_millis(300)).is_none());
    // The upstream saw 0x20 spellings, not the client's lowercase.
    let wire = dns::name_wire(name);
    let spellings: Vec<Vec<u8>> = fake
        .packets()
        .iter()
        .filter_map(|p| p.get(12..12 + wire.len()))
        .filter(|spelled| wire.eq_ignore_ascii_case(spelled))
        .map(<[u8]>::to_vec)
        .collect();
    assert!(
        spellings.len() >= 2,
        "sent and re-sent: {}",
        spellings.len()
    );
    assert!(
        spellings.iter().all(|s| *s != wire),
        "sent in the client's spelling: 0x20 off"
    );
}

/// Nothing listens on the upstream's port: the ICMP port unreachable turns the query into a
/// SERVFAIL at once, not after `--upstream-timeout` (5 s).
fn closed_upstream_port(io: IoBackend) {
    let upstream = free_addr();
    let agent = Agent::start(&AgentConfig::new(io, upstream));
    let client = dns::udp_client(Duration::from_secs(8));
    for i in 0..3u16 {
        let q = dns::query(0x100 + i, &format!("q{i}.allowed.test"), TYPE_A, None);
        let start = Instant::now();
        client.send_to(&q, agent.addr).expect("send");
        let reply = dns::recv_reply(&client, Duration::from_secs(8)).expect("an answer");
        let took = start.elapsed();
        assert_eq!(dns::rcode(&reply), rcode::SERVFAIL);
        assert_eq!(&reply[0..2], &(0x100 + i).to_be_bytes());
        assert!(took < Duration::from_millis(100), "SERVFAIL after {took:?}");
    }
    let counted = poll_until(Duration::from_secs(2), || {
        let n = agent.metric_sum("dnsfence_upstream_unreachable_total");
        (n >= 3.0).then_some(n)
    });
    assert_eq!(counted, Some(3.0));
    assert_eq!(agent.metric_sum("dnsfence_timeouts_total"), 0.0);
}

/// A query with a stray answer record, an extra additional record and an OPT carrying a
/// client cookie reaches the upstream as header, question and a minimal OPT; a refusal of
/// the same shape carries a minimal OPT without the cookie.
fn forwarded_records(io: IoBackend) {
    let fake = FakeUpstream::start(FakeMode::Answer);
    let agent = Agent::start(&AgentConfig::new(io, fake.addr));
    let with_records = |id: u16, name: &str| {
        let mut q = dns::query(id, name, TYPE_A, None);
        q[7] = 1; // ANCOUNT
        q[11] = 2; // ARCOUNT
        q.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 6, 6, 6, 6]);
        q.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 6, 6, 6, 7]);
        q.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0x80, 0, 0, 12]);
        q.extend_from_slice(&[0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
        q
    };
    let name = "records.allowed.test";
    let q = with_records(0x77, name);
    let reply = dns::udp_exchange(agent.addr, &q, Duration::from_secs(3)).expect("reply");
    assert_eq!(dns::rcode(&reply), rcode::NOERROR);
    let wire = dns::name_wire(name);
    let fwd = fake
        .packets()
        .into_iter()
        .find(|p| p.len() > 12 + wire.len() && wire.eq_ignore_ascii_case(&p[12..12 + wire.len()]))
        .expect("forwarded");
    let question_end = 12 + dns::name_wire(name).len() + 4;
    assert_eq!(&fwd[4..12], &[0, 1, 0, 0, 0, 0, 0, 1], "{fwd:02x?}");
    assert_eq!(
        &fwd[question_end..],
        &[0, 0, 41, 0x04, 0xd0, 0, 0, 0x80, 0, 0, 0],
        "one minimal OPT, no client record or option"
    );
    // A refusal: minimal OPT (the agent's payload size), no cookie echoed.
    let q = with_records(0x78, "evil.example");
    let reply = dns::udp_exchange(agent.addr, &q, Duration::from_secs(3)).expect("reply");
    assert_eq!(dns::rcode(&reply), rcode::REFUSED);
    let question_end = 12 + dns::name_wire("evil.example").len() + 4;
    assert_eq!(&reply[6..12], &[0, 0, 0, 0, 0, 1]);
    assert_eq!(
        &reply[question_end..],
        &[0, 0, 41, 0x10, 0, 0, 0, 0x80, 0, 0, 0]
    );
    // A FORMERR (undefined class): the header and the same minimal OPT.
    let mut q = with_records(0x79, name);
    q[12 + dns::name_wire(name).len() + 3] = 9;
    let reply = dns::udp_exchange(agent.addr, &q, Duration::from_secs(3)).expect("reply");
    assert_eq!(dns::rcode(&reply), rcode::FORMERR);
    assert_eq!(
        &reply[4..],
        &[
            0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 41, 0x10, 0, 0, 0, 0x80, 0, 0, 0
        ]
    );
}

/// An upstream that lowercases questions: the first 4 queries fail at once (SERVFAIL, not a
/// timeout), then 0x20 is off for it, which is counted and logged once, and queries are
/// answered. (0x20 is on by default: on the old code all six were answered.)
fn case_fallback(io: IoBackend) {
    let fake = FakeUpstream::start(FakeMode::Lowercase);
    let agent = Agent::start(&AgentConfig::new(io, fake.addr));
    let mut rcodes = Vec::new();
    for i in 0..7u16 {
        let q = dns::query(0x300 + i, &format!("Case{i}.Allowed.Test"), TYPE_A, None);
        let start = Instant::now();
        let reply = dns::udp_exchange(agent.addr, &q, Duration::from_secs(3)).expect("reply");
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
        rcodes.push(dns::rcode(&reply));
    }
    let (s, n) = (rcode::SERVFAIL, rcode::NOERROR);
    assert_eq!(rcodes, [s, s, s, s, n, n, n]);
    assert_eq!(
        poll_until(Duration::from_secs(2), || {
            let n = agent.metric_sum("dnsfence_upstream_0x20_disabled_total");
            (n > 0.0).then_some(n)
        }),
        Some(1.0)
    );
    let logged = poll_until(Duration::from_secs(2), || {
        let err = agent.process.stderr();
        err.contains("does not preserve the letter case")
            .then_some(err)
    })
    .expect("logged");
    assert_eq!(
        logged.matches("does not preserve the letter case").count(),
        1
    );
    // The names went upstream in 0x20 spellings, then as the client spelled them.
    let names: Vec<String> = fake
        .packets()
        .iter()
        .filter(|p| p.len() > 18 && p[12] == 5 && p[13..17].eq_ignore_ascii_case(b"case"))
        .map(|p| String::from_utf8_lossy(&p[13..18]).into_owned())
        .collect();
    assert_eq!(names.len(), 7, "{names:?}");
    assert_eq!(&names[4..], ["Case4", "Case5", "Case6"]);
}
