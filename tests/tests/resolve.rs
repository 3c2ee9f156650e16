//! Issue #3 acceptance, part 1: `dnsfence agent --no-bpf` resolving through real upstreams over
//! UDP and TCP, on both I/O backends: verdicts, 0x20, reject rcode, CNAME chains, truncation,
//! EDNS0, upstream errors and an upstream that never answers.

use std::time::{Duration, Instant};

use dnsfence_tests::dns::{self, TYPE_A, rcode};
use dnsfence_tests::upstream::{Bundled, FakeMode, FakeUpstream, Knot};
use dnsfence_tests::{
    Agent, AgentConfig, IoBackend, both_backends, dig, free_addr, free_port, poll_until,
};

const T: Duration = Duration::from_secs(3);

both_backends! {
    allowed_answered_denied_refused_and_never_forwarded => allowed_and_denied,
    knot_upstream_answers_and_counts => knot_upstream,
    upstream_0x20_against_knot => upstream_0x20,
    mixed_case_spelling_kept => mixed_case,
    reject_rcode_nxdomain => reject_nxdomain,
    cname_chain_passes_through => cname_chain,
    truncated_answer_then_tcp_retry => truncation,
    edns0_queries => edns0,
    upstream_rcodes_relayed => upstream_rcodes,
    silent_upstream_gets_servfail => silent_upstream,
    upstream_without_tcp_gets_servfail => upstream_without_tcp,
    upstream_restart_tcp_reconnects => upstream_restart,
    tcp_pipelined_queries_all_answered => tcp_pipelined,
    unknown_source_refused_unless_allowed => unknown_source,
    ipv6_listen => ipv6_listen,
}

fn allowed_and_denied(io: IoBackend) {
    let fake = FakeUpstream::start(FakeMode::Answer);
    let agent = Agent::start(&AgentConfig::new(io, fake.addr));
    for tcp in [false, true] {
        let proto: &[&str] = if tcp { &["+tcp"] } else { &["+notcp"] };
        for name in ["www.allowed.test", "allowed.test"] {
            let r = dig(agent.addr, &[proto, &[name, "A"]].concat());
            assert_eq!(r.status, "NOERROR", "{name} tcp={tcp}: {}", r.output);
            assert_eq!(r.rdata("A"), ["192.0.2.53"], "{name}: {}", r.output);
        }
        for name in [
            "www.denied.test",
            "allowed.test.evil",
            "xallowed.test",
            "a.b.allowed.test",
        ] {
            let r = dig(agent.addr, &[proto, &[name, "A"]].concat());
            assert_eq!(r.status, "REFUSED", "{name} tcp={tcp}: {}", r.output);
            assert!(r.answers.is_empty(), "{}", r.output);
            assert_eq!(r.question, format!("{name}."), "question kept");
        }
    }
    // Names outside the policy alphabet match no pattern, not even under an allowed suffix.
    for name in ["*.allowed.test", "a b.allowed.test", "x/y.allowed.test"] {
        let q = dns::query(0x2a2a, name, TYPE_A, None);
        let raw = dns::udp_exchange(agent.addr, &q, T).expect("reply");
        assert_eq!(dns::rcode(&raw), rcode::REFUSED, "{name:?}");
        assert_eq!(&raw[12..q.len()], &q[12..], "{name:?}: question kept");
    }
    // Only the allowed names reached the upstream, once per query.
    let names = fake.names();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            "allowed.test",
            "allowed.test",
            "www.allowed.test",
            "www.allowed.test"
        ],
        "upstream saw {names:?}"
    );
    // Counters are published about every 100 ms; 11 denied queries plus the readiness probes.
    let refused = poll_until(T, || {
        let n = agent.metric_sum("dnsfence_refused_total");
        (n >= 11.0).then_some(n)
    });
    assert!(
        refused.is_some(),
        "refused counter {}",
        agent.metric_sum("dnsfence_refused_total")
    );
}

/// With `--upstream-0x20` the agent sends its own letter case upstream and accepts only answers
/// that echo it; knot does, so everything resolves as before, over UDP and TCP.
fn upstream_0x20(io: IoBackend) {
    let knot = Knot::start();
    let agent = Agent::start(&AgentConfig::new(io, knot.addr).args(&["--upstream-0x20", "on"]));
    for proto in ["+notcp", "+tcp"] {
        let r = dig(agent.addr, &[proto, "WwW.AlLoWeD.TeSt", "A"]);
        assert_eq!(r.status, "NOERROR", "{}", r.output);
        assert_eq!(r.rdata("A"), ["192.0.2.8"], "{}", r.output);
        assert!(
            r.output.contains("WwW.AlLoWeD.TeSt."),
            "client spelling: {}",
            r.output
        );
    }
    assert_eq!(
        agent.metric_sum("dnsfence_upstream_wrong_question_total"),
        0.0
    );
}

fn knot_upstream(io: IoBackend) {
    let knot = Knot::start();
    let agent = Agent::start(&AgentConfig::new(io, knot.addr));
    // The readiness probe of knot counts as one.
    let mut allowed_queries = knot.requests();
    for proto in ["+notcp", "+tcp"] {
        for (name, rtype, want) in [
            ("www.allowed.test", "A", "192.0.2.8"),
            ("www.allowed.test", "AAAA", "2001:db8::8"),
            ("other.allowed.test", "A", "192.0.2.7"),
        ] {
            let direct = dig(knot.addr, &[proto, name, rtype]);
            let r = dig(agent.addr, &[proto, name, rtype]);
            allowed_queries += 2;
            assert_eq!(r.status, "NOERROR", "{}", r.output);
            assert_eq!(r.rdata(rtype), [want], "{}", r.output);
            assert_eq!(r.answers, direct.answers, "same answer as knot's own");
        }
        let r = dig(agent.addr, &[proto, "alias.allowed.test", "A"]);
        allowed_queries += 1;
        assert_eq!(r.rdata("CNAME"), ["www.allowed.test."], "{}", r.output);
        assert_eq!(r.rdata("A"), ["192.0.2.8"], "{}", r.output);
        for name in ["www.denied.test", "x.denied.test"] {
            let r = dig(agent.addr, &[proto, name, "A"]);
            assert_eq!(r.status, "REFUSED", "{}", r.output);
        }
    }
    // knot counted exactly its probe, our direct queries and the allowed ones: the denied
    // never came.
    let counted = poll_until(T, || {
        let n = knot.requests();
        (n == allowed_queries).then_some(n)
    });
    assert_eq!(
        counted,
        Some(allowed_queries),
        "knot stats: {:?}",
        knot.stats()
    );
}

fn mixed_case(io: IoBackend) {
    let up = Bundled::start(&[]);
    let agent = Agent::start(&AgentConfig::new(io, up.addr));
    let spelled = "WwW.AlLoWeD.TeSt";
    let q = dns::query(0xbeef, spelled, TYPE_A, None);
    let direct = dns::parse(
        &dns::udp_exchange(up.addr, &dns::query(1, "www.allowed.test", TYPE_A, None), T).unwrap(),
    );
    for tcp in [false, true] {
        let raw = if tcp {
            dns::tcp_exchange(agent.addr, &q, T)
        } else {
            dns::udp_exchange(agent.addr, &q, T)
        }
        .expect("reply");
        assert_eq!(&raw[..2], &[0xbe, 0xef], "client's ID restored");
        assert_eq!(dns::rcode(&raw), rcode::NOERROR);
        // The question bytes come back exactly as sent.
        let qlen = spelled.len() + 2 + 4;
        assert_eq!(
            &raw[12..12 + qlen],
            &q[12..12 + qlen],
            "question spelling (tcp={tcp})"
        );
        let msg = dns::parse(&raw);
        assert!(!msg.answers.is_empty());
        for rr in &msg.answers {
            assert_eq!(rr.name.to_string(), format!("{spelled}."), "owner spelling");
        }
        assert_eq!(dns::addresses(&msg), dns::addresses(&direct));
    }
    // dig agrees.
    let r = dig(agent.addr, &[spelled]);
    assert_eq!(r.question, format!("{spelled}."));
    assert!(
        r.answers.iter().all(|a| a.owner == format!("{spelled}.")),
        "{}",
        r.output
    );
}

fn reject_nxdomain(io: IoBackend) {
    let fake = FakeUpstream::start(FakeMode::Answer);
    let agent =
        Agent::start(&AgentConfig::new(io, fake.addr).args(&["--reject-rcode", "nxdomain"]));
    for proto in ["+notcp", "+tcp"] {
        let r = dig(agent.addr, &[proto, "www.denied.test"]);
        assert_eq!(r.status, "NXDOMAIN", "{}", r.output);
        assert!(r.answers.is_empty());
        let r = dig(agent.addr, &[proto, "www.allowed.test"]);
        assert_eq!(r.status, "NOERROR", "{}", r.output);
    }
    assert!(
        fake.names().iter().all(|n| n == "www.allowed.test"),
        "{:?}",
        fake.names()
    );
}

fn cname_chain(io: IoBackend) {
    let up = Bundled::start(&[]);
    let agent = Agent::start(&AgentConfig::new(io, up.addr));
    for proto in ["+notcp", "+tcp"] {
        let name = "cname-3-Chain.allowed.test";
        let direct = dig(up.addr, &[proto, name]);
        let r = dig(agent.addr, &[proto, name]);
        assert_eq!(r.status, "NOERROR", "{}", r.output);
        // The bundled upstream spells CNAME targets as it was asked, and the agent asks in a
        // 0x20 spelling: names compare case-insensitively.
        let cnames: Vec<String> = r.rdata("CNAME").iter().map(|c| c.to_lowercase()).collect();
        assert_eq!(
            cnames,
            [
                "cname-2-chain.allowed.test.",
                "cname-1-chain.allowed.test.",
                "cname-0-chain.allowed.test."
            ],
            "{}",
            r.output
        );
        assert_eq!(r.rdata("A").len(), 1, "{}", r.output);
        let lower = |answers: &[dnsfence_tests::dns::Rr]| format!("{answers:?}").to_lowercase();
        assert_eq!(lower(&r.answers), lower(&direct.answers));
    }
}

fn truncation(io: IoBackend) {
    let up = Bundled::start(&["--ips", "4"]);
    let agent = Agent::start(&AgentConfig::new(io, up.addr));
    // Over UDP the TC bit and the empty answer pass through untouched.
    let q = dns::query(0x7c7c, "tc-big.allowed.test", TYPE_A, None);
    let raw = dns::udp_exchange(agent.addr, &q, T).expect("UDP reply");
    let msg = dns::parse(&raw);
    assert!(msg.metadata.truncation, "TC relayed");
    assert!(msg.answers.is_empty());
    assert_eq!(msg.metadata.id, 0x7c7c);
    // dig retries over TCP and gets the whole answer.
    let r = dig(agent.addr, &["tc-big.allowed.test"]);
    assert!(
        r.output.contains("Truncated, retrying in TCP mode"),
        "{}",
        r.output
    );
    assert_eq!(r.status, "NOERROR", "{}", r.output);
    assert!(!r.flags.iter().any(|f| f == "tc"), "{}", r.output);
    assert_eq!(r.rdata("A").len(), 4, "{}", r.output);
    let direct = dig(up.addr, &["+tcp", "tc-big.allowed.test"]);
    assert_eq!(r.answers, direct.answers);
    let truncated = poll_until(T, || {
        (agent.metric_sum("dnsfence_truncated_total") >= 1.0).then_some(())
    });
    assert!(truncated.is_some(), "dnsfence_truncated_total stays 0");
}

fn edns0(io: IoBackend) {
    let up = Bundled::start(&["--ips", "8"]);
    let agent = Agent::start(&AgentConfig::new(io, up.addr));
    for tcp in [false, true] {
        let q = dns::query(0x0ed5, "edns.allowed.test", dns::TYPE_AAAA, Some(1232));
        let raw = if tcp {
            dns::tcp_exchange(agent.addr, &q, T)
        } else {
            dns::udp_exchange(agent.addr, &q, T)
        }
        .expect("reply");
        let msg = dns::parse(&raw);
        assert_eq!(msg.metadata.response_code, dns::ResponseCode::NoError);
        assert!(msg.edns.is_some(), "OPT echoed (tcp={tcp})");
        assert_eq!(dns::addresses(&msg).len(), 8);
        // A denied EDNS query: REFUSED with the OPT record kept.
        let q = dns::query(0x0ed6, "edns.denied.test", TYPE_A, Some(4096));
        let raw = dns::udp_exchange(agent.addr, &q, T).expect("reply");
        let msg = dns::parse(&raw);
        assert_eq!(msg.metadata.response_code, dns::ResponseCode::Refused);
        assert!(msg.edns.is_some(), "OPT kept in the refusal");
    }
    let r = dig(
        agent.addr,
        &["+edns=0", "+bufsize=1232", "+dnssec", "www.allowed.test"],
    );
    assert_eq!(r.status, "NOERROR", "{}", r.output);
    assert!(r.edns, "{}", r.output);
    let r = dig(agent.addr, &["+noedns", "www.allowed.test"]);
    assert_eq!(r.status, "NOERROR", "{}", r.output);
    assert!(!r.edns, "{}", r.output);
}

fn upstream_rcodes(io: IoBackend) {
    let up = Bundled::start(&[]);
    let agent = Agent::start(&AgentConfig::new(io, up.addr));
    for proto in ["+notcp", "+tcp"] {
        for (name, status) in [
            ("nxdomain-x.allowed.test", "NXDOMAIN"),
            ("servfail-x.allowed.test", "SERVFAIL"),
            ("refused-x.allowed.test", "REFUSED"),
        ] {
            let r = dig(agent.addr, &[proto, name]);
            assert_eq!(r.status, status, "{name} {proto}: {}", r.output);
            assert_eq!(r.question, format!("{name}."));
        }
    }
}

fn silent_upstream(io: IoBackend) {
    let fake = FakeUpstream::start(FakeMode::Silent);
    let agent =
        Agent::start(&AgentConfig::new(io, fake.addr).args(&["--upstream-timeout", "500ms"]));
    for tcp in [false, true] {
        let q = dns::query(0x5f5f, "www.allowed.test", TYPE_A, None);
        let start = Instant::now();
        let raw = if tcp {
            dns::tcp_exchange(agent.addr, &q, Duration::from_secs(3))
        } else {
            dns::udp_exchange(agent.addr, &q, Duration::from_secs(3))
        }
        .unwrap_or_else(|| panic!("silence instead of SERVFAIL (tcp={tcp})"));
        let took = start.elapsed();
        assert_eq!(dns::rcode(&raw), rcode::SERVFAIL, "tcp={tcp}");
        assert_eq!(&raw[..2], &[0x5f, 0x5f]);
        assert!(
            took >= Duration::from_millis(450) && took < Duration::from_millis(2000),
            "SERVFAIL after {took:?} (timeout 500ms, tcp={tcp})"
        );
    }
    assert_eq!(fake.names(), ["www.allowed.test", "www.allowed.test"]);
    let timeouts = poll_until(T, || {
        let n = agent.metric_sum("dnsfence_timeouts_total");
        (n >= 2.0).then_some(n)
    });
    assert_eq!(timeouts, Some(2.0));
}

fn upstream_without_tcp(io: IoBackend) {
    let up = Bundled::start(&["--no-tcp"]);
    let agent = Agent::start(&AgentConfig::new(io, up.addr).args(&["--upstream-timeout", "1s"]));
    let q = dns::query(0x0bad, "www.allowed.test", TYPE_A, None);
    let start = Instant::now();
    let raw = dns::tcp_exchange(agent.addr, &q, Duration::from_secs(4))
        .expect("silence instead of SERVFAIL when the upstream refuses TCP");
    assert_eq!(dns::rcode(&raw), rcode::SERVFAIL);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    // UDP is unaffected.
    let raw = dns::udp_exchange(agent.addr, &q, T).expect("UDP answer");
    assert_eq!(dns::rcode(&raw), rcode::NOERROR);
}

fn upstream_restart(io: IoBackend) {
    let addr = free_addr();
    let up = Bundled::start_on(addr, &[]);
    let agent = Agent::start(&AgentConfig::new(io, addr).args(&["--upstream-timeout", "1s"]));
    assert_eq!(
        dig(agent.addr, &["+tcp", "a.allowed.test"]).status,
        "NOERROR"
    );
    // The upstream goes away (its TCP connection with it) and comes back on the same port.
    drop(up);
    let _up = Bundled::start_on(addr, &[]);
    for i in 0..3 {
        let name = format!("b{i}.allowed.test");
        let r = dig(agent.addr, &["+tcp", &name]);
        assert_eq!(
            r.status, "NOERROR",
            "TCP query {i} after the restart: {}",
            r.output
        );
    }
    assert_eq!(dig(agent.addr, &["c.allowed.test"]).status, "NOERROR");
}

fn tcp_pipelined(io: IoBackend) {
    let up = Bundled::start(&[]);
    let agent = Agent::start(&AgentConfig::new(io, up.addr));
    let mut conn = dns::tcp_connect(agent.addr, T);
    // 20 queries in one write: allowed ones (delayed upstream) and denied ones interleaved.
    let mut batch = Vec::new();
    for i in 0..20u16 {
        let name = if i % 2 == 0 {
            format!("delay-{}-p{i}.allowed.test", 40 - i)
        } else {
            format!("p{i}.denied.test")
        };
        let q = dns::query(i, &name, TYPE_A, None);
        batch.extend_from_slice(&(q.len() as u16).to_be_bytes());
        batch.extend_from_slice(&q);
    }
    std::io::Write::write_all(&mut conn, &batch).expect("write");
    let mut got = Vec::new();
    for _ in 0..20 {
        let r = dns::tcp_recv(&mut conn).expect("an answer per query");
        got.push((u16::from_be_bytes([r[0], r[1]]), dns::rcode(&r)));
    }
    got.sort();
    let want: Vec<(u16, u8)> = (0..20)
        .map(|i| {
            (
                i,
                if i % 2 == 0 {
                    rcode::NOERROR
                } else {
                    rcode::REFUSED
                },
            )
        })
        .collect();
    assert_eq!(got, want);
}

fn unknown_source(io: IoBackend) {
    let fake = FakeUpstream::start(FakeMode::Answer);
    let q = dns::query(0x0a0a, "www.allowed.test", TYPE_A, None);
    let from_stranger = |agent: &Agent| {
        // 127.0.0.2 is in no endpoint.
        let s = std::net::UdpSocket::bind("127.0.0.2:0").expect("bind 127.0.0.2");
        s.send_to(&q, agent.addr).expect("send");
        dns::recv_reply(&s, T).expect("reply")
    };
    let agent = Agent::start(&AgentConfig::new(io, fake.addr));
    assert_eq!(dns::rcode(&from_stranger(&agent)), rcode::REFUSED);
    assert!(fake.names().is_empty(), "{:?}", fake.names());
    let counted = poll_until(T, || {
        (agent.metric_sum("dnsfence_refused_unknown_source_total") >= 1.0).then_some(())
    });
    assert!(counted.is_some());
    let open = Agent::start(&AgentConfig::new(io, fake.addr).args(&["--unknown-source", "allow"]));
    assert_eq!(dns::rcode(&from_stranger(&open)), rcode::NOERROR);
    assert_eq!(fake.names(), ["www.allowed.test"]);
}

fn ipv6_listen(io: IoBackend) {
    let fake = FakeUpstream::start(FakeMode::Answer);
    let mut config = AgentConfig::new(io, fake.addr);
    config.listen = Some(std::net::SocketAddr::from((
        std::net::Ipv6Addr::LOCALHOST,
        free_port(),
    )));
    let agent = Agent::start(&config);
    for proto in ["+notcp", "+tcp"] {
        let r = dig(agent.addr, &[proto, "www.allowed.test"]);
        assert_eq!(r.status, "NOERROR", "{}", r.output);
        assert_eq!(r.rdata("A"), ["192.0.2.53"]);
        assert_eq!(
            dig(agent.addr, &[proto, "www.denied.test"]).status,
            "REFUSED"
        );
    }
}
