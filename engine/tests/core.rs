//! The sans-IO core driven with a virtual clock: every per-query behaviour of the data plane,
//! including each kind of bad input, without a socket.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use dnsfence_engine::allow::{AllowBatch, AllowSink, LedgerConfig, PortSpec, UserspaceAllowTable};
use dnsfence_engine::core::{Client, Core, CoreConfig, Destination, Record, UnknownSource};
use dnsfence_engine::wire::{self, Rcode, TYPE_A, TYPE_AAAA, TYPE_CNAME};
use dnsfence_policy::EndpointKey;

const UPSTREAM: &str = "127.0.0.53:53";

fn upstream() -> SocketAddr {
    UPSTREAM.parse().unwrap()
}

/// The tests' configuration. DNS 0x20 (on by default) is off here so that hand-built answers
/// may spell the question in lowercase; the 0x20 tests switch it on.
fn config() -> CoreConfig {
    let mut c = CoreConfig::new(upstream());
    c.upstream_timeout = Duration::from_secs(2);
    c.max_pending = 64;
    c.upstream_0x20 = false;
    c
}

struct Harness {
    core: Core,
    table: UserspaceAllowTable,
    t0: Instant,
}

impl Harness {
    fn new(config: CoreConfig) -> Harness {
        Harness {
            core: Core::new(config, Arc::new(test_snapshot())),
            table: UserspaceAllowTable::new(LedgerConfig::default()),
            t0: Instant::now(),
        }
    }

    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    /// Commits allow entries and drains every transmit.
    fn drain(&mut self, ms: u64) -> Vec<(Destination, Vec<u8>)> {
        let now = self.at(ms);
        self.core.commit_allows(now, &mut &self.table);
        self.transmits()
    }

    fn transmits(&mut self) -> Vec<(Destination, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some(t) = self.core.poll_transmit() {
            out.push((t.to, t.data.to_vec()));
        }
        out
    }

    fn query(&mut self, ms: u64, from: &str, packet: &[u8]) -> Vec<(Destination, Vec<u8>)> {
        self.core.handle_client(
            self.at(ms),
            Client::Udp(from.parse().unwrap()),
            None,
            packet,
        );
        self.drain(ms)
    }

    /// Sends `packet` from the client and returns the forwarded query and its socket.
    fn forward(&mut self, ms: u64, packet: &[u8]) -> (u16, Vec<u8>) {
        let out = self.query(ms, CLIENT, packet);
        assert_eq!(out.len(), 1, "{out:?}");
        match &out[0] {
            (Destination::UpstreamUdp { socket }, bytes) => (*socket, bytes.clone()),
            other => panic!("expected a forward, got {other:?}"),
        }
    }

    fn answer(&mut self, ms: u64, socket: u16, packet: &[u8]) -> Vec<(Destination, Vec<u8>)> {
        self.core
            .handle_upstream(self.at(ms), socket, upstream(), packet);
        self.drain(ms)
    }
}

fn to_client(out: &[(Destination, Vec<u8>)]) -> &[u8] {
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(
        out[0].0,
        Destination::Client(Client::Udp(CLIENT.parse().unwrap()))
    );
    &out[0].1
}

fn rcode(packet: &[u8]) -> u8 {
    packet[3] & 0x0f
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn ep() -> EndpointKey {
    EndpointKey::of("default", "client")
}

#[test]
fn denied_name_is_refused_in_place_and_never_forwarded() {
    let mut h = Harness::new(config());
    let q = query(0xbeef, "Evil.Example.COM", TYPE_A);
    let out = h.query(0, CLIENT, &q);
    let reply = to_client(&out);
    assert_eq!(rcode(reply), Rcode::Refused as u8);
    assert_eq!(&reply[0..2], &[0xbe, 0xef]);
    assert_eq!(&reply[12..], &q[12..], "same question, same spelling");
    assert_eq!(reply[2] & 0x80, 0x80, "QR");
    assert_eq!(reply[3] & 0x80, 0x80, "RA");
    assert_eq!(h.core.stats().refused, 1);
    assert_eq!(h.core.stats().forwarded, 0);
}

#[test]
fn reject_rcode_nxdomain() {
    let mut c = config();
    c.reject_rcode = Rcode::NxDomain;
    let mut h = Harness::new(c);
    let out = h.query(0, CLIENT, &query(1, "evil.example.com", TYPE_A));
    assert_eq!(rcode(to_client(&out)), Rcode::NxDomain as u8);
}

#[test]
fn allowed_name_is_forwarded_and_answer_released_after_its_allow_write() {
    let mut h = Harness::new(config());
    let q = query(0x1234, "wWw.AlLoWeD.TeSt", TYPE_A);
    let (socket, fwd) = h.forward(0, &q);
    assert_ne!(
        &fwd[0..2],
        &q[0..2],
        "fresh upstream ID (1 in 65536 flake chance)"
    );
    assert_eq!(
        &fwd[2..],
        &q[2..],
        "query otherwise unchanged, 0x20 spelling kept"
    );

    // The upstream answers with a lowercased question.
    let upstream_id = u16::from_be_bytes([fwd[0], fwd[1]]);
    let ans = answer(
        upstream_id,
        "www.allowed.test",
        TYPE_A,
        &[("www.allowed.test", TYPE_A, 300, &rdata_a("127.1.2.3"))],
    );
    h.core.handle_upstream(h.at(5), socket, upstream(), &ans);
    // Before the batch's allow write, nothing may be sent.
    assert!(
        h.transmits().is_empty(),
        "answer released before its allow entry"
    );
    assert!(!allowed_443(&h.table, ep(), ip("127.1.2.3"), h.at(5)));
    let out = h.drain(5);
    assert!(allowed_443(&h.table, ep(), ip("127.1.2.3"), h.at(6)));
    let reply = to_client(&out);
    assert_eq!(&reply[0..2], &[0x12, 0x34], "client ID restored");
    assert_eq!(
        &reply[12..12 + 18],
        &q[12..12 + 18],
        "client 0x20 spelling restored"
    );
    assert_eq!(rcode(reply), 0);
    // The entry outlives the client's cached answer by half a TTL of headroom (so repeated
    // answers within that half need no write), then expires.
    assert!(allowed_443(&h.table, ep(), ip("127.1.2.3"), h.at(449_000)));
    assert!(!allowed_443(&h.table, ep(), ip("127.1.2.3"), h.at(450_010)));
    // Only on the port the toFQDNs rule opens.
    assert!(
        !h.table
            .is_allowed(ep(), ip("127.1.2.3"), 80, PortSpec::TCP, h.at(6))
    );
    assert!(
        !h.table
            .is_allowed(ep(), ip("127.1.2.3"), 443, PortSpec::UDP, h.at(6))
    );

    let records: Vec<Record> = std::iter::from_fn(|| h.core.poll_record()).collect();
    let update = records
        .iter()
        .find_map(|r| match r {
            Record::Addresses(u) => Some(u),
            _ => None,
        })
        .expect("an IP update");
    assert_eq!(update.endpoint, ep());
    assert_eq!(update.name.to_string(), "www.allowed.test.");
    assert_eq!(update.addresses.ips(), &[ip("127.1.2.3")]);
    assert_eq!(update.ttl, 300);
    assert!(update.rules_total >= 1);
}

#[test]
fn unchanged_address_sets_cost_no_write() {
    let mut h = Harness::new(config());
    for i in 0..5u64 {
        let (socket, fwd) = h.forward(i * 10, &query(7, "a.allowed.test", TYPE_A));
        let id = u16::from_be_bytes([fwd[0], fwd[1]]);
        let ans = answer(
            id,
            "a.allowed.test",
            TYPE_A,
            &[("a.allowed.test", TYPE_A, 600, &rdata_a("127.0.0.9"))],
        );
        let out = h.answer(i * 10 + 1, socket, &ans);
        assert_eq!(to_client(&out)[0..2], [0, 7]);
    }
    assert_eq!(
        h.core.stats().allow_writes,
        1,
        "only the first answer needed a write"
    );
    // A new address for the same name is written.
    let (socket, fwd) = h.forward(100, &query(8, "a.allowed.test", TYPE_A));
    let id = u16::from_be_bytes([fwd[0], fwd[1]]);
    let ans = answer(
        id,
        "a.allowed.test",
        TYPE_A,
        &[
            ("a.allowed.test", TYPE_A, 600, &rdata_a("127.0.0.9")),
            ("a.allowed.test", TYPE_A, 600, &rdata_a("127.0.0.11")),
        ],
    );
    h.answer(101, socket, &ans);
    assert_eq!(h.core.stats().allow_writes, 2);
}

/// DNS rebinding onto the node, judged by the core itself (a standalone proxy serving its
/// persisted policy writes through a ledger with no snapshot yet): with the node's default
/// facts, a node-local answer is released but opens nothing.
#[test]
fn node_local_answers_open_nothing_by_default() {
    let mut h = Harness::new(config());
    let defaults = dnsfence_policy::cidr::NodeFacts::default();
    h.core
        .set_snapshot(Arc::new(snapshot_on(POLICY, &defaults)));
    let (socket, fwd) = h.forward(0, &query(7, "meta.allowed.test", TYPE_A));
    let id = u16::from_be_bytes([fwd[0], fwd[1]]);
    let ans = answer(
        id,
        "meta.allowed.test",
        TYPE_A,
        &[
            (
                "meta.allowed.test",
                TYPE_A,
                600,
                &rdata_a("169.254.169.254"),
            ),
            ("meta.allowed.test", TYPE_A, 600, &rdata_a("127.0.0.9")),
            ("meta.allowed.test", TYPE_A, 600, &rdata_a("203.0.113.9")),
        ],
    );
    let out = h.answer(1, socket, &ans);
    assert_eq!(to_client(&out)[0..2], [0, 7], "the answer is released");
    assert_eq!(h.core.stats().addresses_in_cluster, 2);
    assert!(!allowed_443(&h.table, ep(), ip("169.254.169.254"), h.at(2)));
    assert!(!allowed_443(&h.table, ep(), ip("127.0.0.9"), h.at(2)));
    assert!(allowed_443(&h.table, ep(), ip("203.0.113.9"), h.at(2)));
}

/// The allow table's epoch moved (the other writer of a shared map removed entries): the
/// shard forgets what it remembers as written, and the next answer goes to the sink.
#[test]
fn a_new_allow_epoch_makes_the_next_answer_write_again() {
    let mut h = Harness::new(config());
    let ask = |h: &mut Harness, i: u64| {
        let (socket, fwd) = h.forward(i * 10, &query(7, "a.allowed.test", TYPE_A));
        let id = u16::from_be_bytes([fwd[0], fwd[1]]);
        let ans = answer(
            id,
            "a.allowed.test",
            TYPE_A,
            &[("a.allowed.test", TYPE_A, 600, &rdata_a("127.0.0.9"))],
        );
        h.answer(i * 10 + 1, socket, &ans);
    };
    ask(&mut h, 0);
    ask(&mut h, 1);
    assert_eq!(h.core.stats().allow_writes, 1);
    h.core.note_allow_epoch(0);
    ask(&mut h, 2);
    assert_eq!(
        h.core.stats().allow_writes,
        1,
        "the same epoch: nothing to write"
    );
    h.core.note_allow_epoch(1);
    ask(&mut h, 3);
    assert_eq!(h.core.stats().allow_writes, 2, "a new epoch: written again");
    ask(&mut h, 4);
    assert_eq!(h.core.stats().allow_writes, 2);
}

#[test]
fn cname_chain_is_followed_and_off_chain_records_never_allowed() {
    let mut h = Harness::new(config());
    let (socket, fwd) = h.forward(0, &query(9, "svc.allowed.test", TYPE_AAAA));
    let id = u16::from_be_bytes([fwd[0], fwd[1]]);
    let (edge, node) = (
        rdata_name("edge.cdn.example"),
        rdata_name("node.cdn.example"),
    );
    let (victim, fd1, a7) = (
        rdata_a("127.6.6.6"),
        rdata_aaaa("fd00::1"),
        rdata_a("127.0.0.7"),
    );
    let records = |cap: u32| {
        answer(
            id,
            "svc.allowed.test",
            TYPE_AAAA,
            &[
                ("svc.allowed.test", TYPE_CNAME, 120.min(cap), &edge),
                ("victim.bank.example", TYPE_A, 9999.min(cap), &victim),
                ("edge.cdn.example", TYPE_CNAME, 60.min(cap), &node),
                ("node.cdn.example", TYPE_AAAA, 300.min(cap), &fd1),
                ("svc.allowed.test", TYPE_A, 300.min(cap), &a7),
            ],
        )
    };
    let ans = records(u32::MAX);
    let out = h.answer(1, socket, &ans);
    let reply = to_client(&out);
    // Passed through whole (off-chain records too), every TTL lowered to the chain's
    // minimum, which the entries are written for: no record may be cached past its entry
    // (review finding: only a chain whose minimum exceeded --max-ttl was lowered, so a
    // 300 s record behind a 60 s CNAME reached the client as 300 s over a 90 s entry).
    assert_eq!(&reply[12..], &records(60)[12..]);
    assert_eq!(h.core.stats().ttl_clamped, 1);
    assert!(allowed_443(&h.table, ep(), ip("fd00::1"), h.at(89_000)));
    assert!(
        !allowed_443(&h.table, ep(), ip("fd00::1"), h.at(90_001)),
        "TTL is the chain minimum"
    );
    assert!(
        !allowed_443(&h.table, ep(), ip("127.6.6.6"), h.at(2)),
        "off-chain record allowed"
    );
    // The alias's own A record is on the chain's first name only before the CNAME is followed:
    // a name that has a CNAME has no other data, so it is ignored too.
    assert_eq!(h.core.stats().off_chain_records, 2);
}

#[test]
fn min_ttl_raises_short_ttls() {
    let mut c = config();
    c.min_ttl = 3600;
    let mut h = Harness::new(c);
    let (socket, fwd) = h.forward(0, &query(9, "x.allowed.test", TYPE_A));
    let id = u16::from_be_bytes([fwd[0], fwd[1]]);
    let ans = answer(
        id,
        "x.allowed.test",
        TYPE_A,
        &[("x.allowed.test", TYPE_A, 5, &rdata_a("127.0.0.5"))],
    );
    h.answer(1, socket, &ans);
    assert!(allowed_443(
        &h.table,
        ep(),
        ip("127.0.0.5"),
        h.at(3_000_000)
    ));
}

#[test]
fn dns_allowed_but_not_fqdn_allowed_needs_no_write() {
    // api.stripe.com is allowed at the DNS layer only (no toFQDNs selector in the test policy).
    let mut h = Harness::new(config());
    let (socket, fwd) = h.forward(0, &query(3, "api.stripe.com", TYPE_A));
    let id = u16::from_be_bytes([fwd[0], fwd[1]]);
    let ans = answer(
        id,
        "api.stripe.com",
        TYPE_A,
        &[("api.stripe.com", TYPE_A, 60, &rdata_a("127.0.0.3"))],
    );
    h.core.handle_upstream(h.at(1), socket, upstream(), &ans);
    let out = h.transmits();
    assert_eq!(rcode(to_client(&out)), 0, "released without waiting");
    assert!(!allowed_443(&h.table, ep(), ip("127.0.0.3"), h.at(2)));
}

#[test]
fn spoofed_answers_are_dropped_and_the_real_one_still_accepted() {
    let mut h = Harness::new(config());
    let (socket, fwd) = h.forward(0, &query(0x4242, "s.allowed.test", TYPE_A));
    let id = u16::from_be_bytes([fwd[0], fwd[1]]);
    let evil = [("s.allowed.test", TYPE_A, 300, &rdata_a("127.6.6.6")[..])];
    // Wrong source address.
    let spoof = answer(id, "s.allowed.test", TYPE_A, &evil);
    h.core
        .handle_upstream(h.at(1), socket, "127.0.0.66:53".parse().unwrap(), &spoof);
    // Wrong ID.
    let spoof = answer(id.wrapping_add(1), "s.allowed.test", TYPE_A, &evil);
    h.core.handle_upstream(h.at(1), socket, upstream(), &spoof);
    // Right ID on the wrong socket.
    let other = (socket + 1) % 4;
    h.core.handle_upstream(
        h.at(1),
        other,
        upstream(),
        &answer(id, "s.allowed.test", TYPE_A, &evil),
    );
    // Right ID, wrong question.
    let spoof = answer(id, "t.allowed.test", TYPE_A, &evil);
    h.core.handle_upstream(h.at(1), socket, upstream(), &spoof);
    // Right ID, wrong type.
    let spoof = answer(id, "s.allowed.test", TYPE_AAAA, &evil);
    h.core.handle_upstream(h.at(1), socket, upstream(), &spoof);
    // Not a response at all.
    h.core.handle_upstream(
        h.at(1),
        socket,
        upstream(),
        &query(id, "s.allowed.test", TYPE_A),
    );
    assert!(h.drain(1).is_empty());
    let s = h.core.stats();
    assert_eq!(s.upstream_wrong_source, 1);
    assert_eq!(s.upstream_unknown_id, 2);
    assert_eq!(s.upstream_wrong_question, 2);
    assert_eq!(s.upstream_malformed, 1);
    assert!(!allowed_443(&h.table, ep(), ip("127.6.6.6"), h.at(2)));

    let real = answer(
        id,
        "s.allowed.test",
        TYPE_A,
        &[("s.allowed.test", TYPE_A, 300, &rdata_a("127.0.0.8"))],
    );
    let out = h.answer(2, socket, &real);
    assert_eq!(&to_client(&out)[0..2], &[0x42, 0x42]);
    // A duplicate of the real answer finds nothing in flight.
    assert!(h.answer(3, socket, &real).is_empty());
    assert_eq!(h.core.stats().upstream_unknown_id, 3);
}

#[test]
fn upstream_timeout_answers_servfail_never_silence() {
    let mut h = Harness::new(config());
    let q = query(0x0102, "slow.allowed.test", TYPE_A);
    h.forward(0, &q);
    h.core.handle_timeout(h.at(1999));
    assert!(h.drain(1999).is_empty());
    assert_eq!(h.core.poll_timeout(), Some(h.at(2000)));
    h.core.handle_timeout(h.at(2000));
    let out = h.drain(2000);
    let reply = to_client(&out);
    assert_eq!(rcode(reply), Rcode::ServFail as u8);
    assert_eq!(&reply[0..2], &[1, 2]);
    assert_eq!(&reply[12..], &q[12..]);
    assert_eq!(h.core.stats().timeouts, 1);
    assert_eq!(h.core.in_flight(), 0);
}

#[test]
fn malformed_queries_are_counted_verdicts_and_the_next_query_is_served() {
    let mut h = Harness::new(config());
    let good = query(0x0a0b, "ok.allowed.test", TYPE_A);
    let mut cases: Vec<(&str, Vec<u8>, Option<u8>)> = vec![
        ("empty", vec![], None),
        ("short header", good[..11].to_vec(), None),
        ("header only", good[..12].to_vec(), Some(1)),
    ];
    let mut response = good.clone();
    response[2] |= 0x80;
    cases.push(("response bit: dropped, never answered", response, None));
    let mut qd2 = good.clone();
    qd2[5] = 2;
    cases.push(("qdcount 2", qd2, Some(1)));
    let mut qd0 = good.clone();
    qd0[5] = 0;
    cases.push(("qdcount 0", qd0, Some(1)));
    let mut bad_label = good.clone();
    bad_label[12] = 0x3f;
    cases.push(("label runs off the end", bad_label, Some(1)));
    let mut reserved = good.clone();
    reserved[12] = 0x80;
    cases.push(("reserved label type", reserved, Some(1)));
    let mut looped = good[..12].to_vec();
    looped.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
    cases.push(("compression loop", looped, Some(1)));
    let mut forward = good[..12].to_vec();
    forward.extend_from_slice(&[0xc0, 0x12, 0, 1, 0, 1, 1, b'a', 0]);
    cases.push(("forward pointer", forward, Some(1)));
    let mut class = good.clone();
    let n = class.len();
    class[n - 1] = 7;
    cases.push(("unknown class", class, Some(1)));
    let mut opcode = good.clone();
    opcode[2] |= 0x20;
    cases.push(("opcode update", opcode, Some(4)));
    let mut long = good[..12].to_vec();
    for _ in 0..5 {
        long.push(60);
        long.extend_from_slice(&[b'a'; 60]);
    }
    long.extend_from_slice(&[0, 0, 1, 0, 1]);
    cases.push(("name over 255", long, Some(1)));

    for (what, packet, expect) in &cases {
        let out = h.query(0, CLIENT, packet);
        match expect {
            None => assert!(out.is_empty(), "{what}: {out:?}"),
            Some(rc) => {
                let reply = to_client(&out);
                assert_eq!(rcode(reply), *rc, "{what}");
                assert_eq!(&reply[0..2], &packet[0..2], "{what}: same ID");
            }
        }
    }
    let s = *h.core.stats();
    assert_eq!(s.malformed_dropped, 2);
    assert_eq!(s.responses_dropped, 1);
    assert_eq!(s.malformed_answered as usize, cases.len() - 3);
    assert_eq!(s.forwarded, 0, "nothing malformed reached the upstream");
    h.forward(1, &good);
}

#[test]
fn names_outside_the_policy_alphabet_are_refused() {
    let mut h = Harness::new(config());
    // A structurally valid name with a space and a star: no pattern can match it.
    let out = h.query(0, CLIENT, &query(5, "a b.allowed.test", TYPE_A));
    assert_eq!(rcode(to_client(&out)), Rcode::Refused as u8);
    let out = h.query(0, CLIENT, &query(5, "*.allowed.test", TYPE_A));
    assert_eq!(rcode(to_client(&out)), Rcode::Refused as u8);
    // The unrestricted endpoint may resolve it.
    let out = h.query(0, OPEN_CLIENT, &query(5, "a b.allowed.test", TYPE_A));
    assert!(matches!(out[0].0, Destination::UpstreamUdp { .. }));
}

#[test]
fn unknown_sources_by_flag() {
    let mut h = Harness::new(config());
    let out = h.query(0, "127.9.9.9:1000", &query(5, "x.allowed.test", TYPE_A));
    assert_eq!(rcode(&out[0].1), Rcode::Refused as u8);
    assert_eq!(h.core.stats().refused_unknown_source, 1);

    let mut c = config();
    c.unknown_source = UnknownSource::Allow;
    let mut h = Harness::new(c);
    let out = h.query(0, "127.9.9.9:1000", &query(5, "anything.example", TYPE_A));
    assert!(matches!(out[0].0, Destination::UpstreamUdp { .. }));
}

#[test]
fn unrestricted_endpoint_is_forwarded_without_allow_writes() {
    let mut h = Harness::new(config());
    let out = h.query(0, OPEN_CLIENT, &query(5, "anything.example", TYPE_A));
    let (Destination::UpstreamUdp { socket }, fwd) = &out[0] else {
        panic!("{out:?}")
    };
    let id = u16::from_be_bytes([fwd[0], fwd[1]]);
    let ans = answer(
        id,
        "anything.example",
        TYPE_A,
        &[("anything.example", TYPE_A, 60, &rdata_a("127.0.0.4"))],
    );
    h.core.handle_upstream(h.at(1), *socket, upstream(), &ans);
    assert_eq!(h.transmits().len(), 1);
    assert_eq!(h.core.stats().allow_writes, 0);
}

#[test]
fn truncated_answers_pass_through_untouched() {
    let mut h = Harness::new(config());
    let (socket, fwd) = h.forward(0, &query(0x77, "big.allowed.test", TYPE_A));
    let id = u16::from_be_bytes([fwd[0], fwd[1]]);
    let mut ans = answer(id, "big.allowed.test", TYPE_A, &[]);
    ans[2] |= 0x02; // TC
    let out = h.answer(1, socket, &ans);
    let reply = to_client(&out);
    assert_eq!(&reply[2..], &ans[2..]);
    assert_eq!(h.core.stats().truncated, 1);
}

#[test]
fn pending_table_full_answers_servfail_and_memory_stays_bounded() {
    let mut h = Harness::new(config());
    // A flood of unique names, never answered: at most max_pending (64) in flight, and one
    // endpoint at most its fair share of it (as many as are free: 32).
    let mut servfail = 0;
    for i in 0..1000u16 {
        let out = h.query(0, CLIENT, &query(i, &format!("n{i}.allowed.test"), TYPE_A));
        if let (Destination::Client(_), reply) = &out[0] {
            assert_eq!(rcode(reply), Rcode::ServFail as u8);
            servfail += 1;
        }
    }
    assert_eq!(servfail, 1000 - 32);
    assert_eq!(h.core.in_flight(), 32);
    assert_eq!(h.core.stats().pending_full, 968);
    h.core.handle_timeout(h.at(2000));
    assert_eq!(h.drain(2000).len(), 32);
    assert_eq!(h.core.in_flight(), 0);
    h.forward(2001, &query(1, "again.allowed.test", TYPE_A));
}

struct FailingSink;

impl AllowSink for FailingSink {
    fn write(&mut self, _: Instant, batch: &mut AllowBatch) {
        for g in 0..batch.groups.len() {
            batch.settle_group(g, false, &[]);
        }
    }
}

/// Whether the table lets `endpoint` reach `ip` on 443/TCP (the port the fixture's toFQDNs
/// rule opens).
fn allowed_443(
    table: &UserspaceAllowTable,
    endpoint: dnsfence_policy::EndpointKey,
    ip: std::net::IpAddr,
    at: Instant,
) -> bool {
    table.is_allowed(endpoint, ip, 443, PortSpec::TCP, at)
}

#[test]
fn failed_allow_write_turns_the_answer_into_servfail() {
    let mut h = Harness::new(config());
    let (socket, fwd) = h.forward(0, &query(0x99, "w.allowed.test", TYPE_A));
    let id = u16::from_be_bytes([fwd[0], fwd[1]]);
    let ans = answer(
        id,
        "w.allowed.test",
        TYPE_A,
        &[("w.allowed.test", TYPE_A, 60, &rdata_a("127.0.0.2"))],
    );
    h.core.handle_upstream(h.at(1), socket, upstream(), &ans);
    h.core.commit_allows(h.at(1), &mut FailingSink);
    let out = h.transmits();
    assert_eq!(rcode(to_client(&out)), Rcode::ServFail as u8);
    assert_eq!(h.core.stats().allow_write_failures, 1);
    // The FQDN cache is not told of addresses whose entries were not written.
    let records: Vec<Record> = std::iter::from_fn(|| h.core.poll_record()).collect();
    assert!(
        !records.iter().any(|r| matches!(r, Record::Addresses(_))),
        "{records:?}"
    );
}

#[test]
fn in_flight_queries_keep_their_snapshot() {
    let mut h = Harness::new(config());
    let (socket, fwd) = h.forward(0, &query(0x31, "k.allowed.test", TYPE_A));
    // The new policy allows nothing; the query in flight still completes under the old one.
    h.core.set_snapshot(Arc::new(deny_all_snapshot()));
    let id = u16::from_be_bytes([fwd[0], fwd[1]]);
    let ans = answer(
        id,
        "k.allowed.test",
        TYPE_A,
        &[("k.allowed.test", TYPE_A, 60, &rdata_a("127.0.0.31"))],
    );
    let out = h.answer(1, socket, &ans);
    assert_eq!(rcode(to_client(&out)), 0);
    assert!(allowed_443(&h.table, ep(), ip("127.0.0.31"), h.at(2)));
    // New queries see the new snapshot.
    let out = h.query(2, CLIENT, &query(0x32, "k.allowed.test", TYPE_A));
    assert_eq!(rcode(to_client(&out)), Rcode::Refused as u8);
}

#[test]
fn tcp_clients_are_forwarded_over_tcp() {
    let mut h = Harness::new(config());
    let client = Client::Tcp {
        conn: 7,
        peer: CLIENT.parse().unwrap(),
    };
    h.core.handle_client(
        h.at(0),
        client,
        None,
        &query(0x55, "t.allowed.test", TYPE_A),
    );
    let out = h.drain(0);
    assert_eq!(out[0].0, Destination::UpstreamTcp { server: 0 });
    let id = u16::from_be_bytes([out[0].1[0], out[0].1[1]]);
    let ans = answer(
        id,
        "t.allowed.test",
        TYPE_A,
        &[("t.allowed.test", TYPE_A, 60, &rdata_a("127.0.0.55"))],
    );
    h.core.handle_upstream_tcp(h.at(1), 0, &ans);
    let out = h.drain(1);
    assert_eq!(out[0].0, Destination::Client(client));
    assert_eq!(&out[0].1[0..2], &[0, 0x55]);
}

/// Review finding (fixed): a query whose TCP connection to the upstream was lost before the
/// answer waited for the upstream timeout. It is re-sent once, the same bytes; lost again, it
/// is answered SERVFAIL at once. A query on another server's connection is untouched.
#[test]
fn a_lost_upstream_tcp_connection_resends_once_then_fails() {
    let mut c = config();
    c.upstreams = vec![upstream(), "127.0.0.1:5399".parse().unwrap()];
    let mut h = Harness::new(c);
    let client = Client::Tcp {
        conn: 8,
        peer: CLIENT.parse().unwrap(),
    };
    h.core.handle_client(
        h.at(0),
        client,
        None,
        &query(0x56, "lost.allowed.test", TYPE_A),
    );
    let sent = h.drain(0);
    let [(Destination::UpstreamTcp { server }, bytes)] = sent.as_slice() else {
        panic!("{sent:?}");
    };
    let other = 1 - *server;
    h.core.handle_upstream_tcp_closed(h.at(1), other);
    assert!(h.drain(1).is_empty(), "another server's connection");
    h.core.handle_upstream_tcp_closed(h.at(1), *server);
    assert_eq!(
        h.drain(1),
        [(Destination::UpstreamTcp { server: *server }, bytes.clone())]
    );
    assert_eq!(h.core.stats().upstream_tcp_resent, 1);
    h.core.handle_upstream_tcp_closed(h.at(2), *server);
    let out = h.drain(2);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].0, Destination::Client(client));
    assert_eq!(rcode(&out[0].1), Rcode::ServFail as u8);
    assert_eq!(h.core.stats().upstream_unreachable, 1);
    assert!(h.core.poll_timeout().is_none(), "nothing left in flight");
    // A query forwarded in the turn the connection is lost (still queued) goes once.
    h.core.handle_client(
        h.at(3),
        client,
        None,
        &query(0x57, "queued.allowed.test", TYPE_A),
    );
    let server = match h.core.poll_transmit() {
        Some(t) => match t.to {
            Destination::UpstreamTcp { server } => server,
            other => panic!("{other:?}"),
        },
        None => panic!("not forwarded"),
    };
    h.core.handle_client(
        h.at(3),
        client,
        None,
        &query(0x58, "queued2.allowed.test", TYPE_A),
    );
    h.core.handle_upstream_tcp_closed(h.at(3), server);
    let out = h.drain(3);
    // Each of the two queued queries goes once (re-sent after the loss), none twice.
    let mut ids: Vec<[u8; 2]> = out
        .iter()
        .filter(|(d, _)| *d == Destination::UpstreamTcp { server })
        .map(|(_, b)| [b[0], b[1]])
        .collect();
    assert_eq!(ids.len(), 2, "{out:?}");
    ids.dedup();
    assert_eq!(ids.len(), 2, "{out:?}");
}

#[test]
fn edns_opt_is_kept_in_refusals_and_forwarded() {
    let mut h = Harness::new(config());
    let q = with_opt(query(0x66, "evil.example", TYPE_A));
    let out = h.query(0, CLIENT, &q);
    let reply = to_client(&out);
    assert_eq!(reply.len(), q.len());
    assert_eq!(&reply[10..12], &[0, 1]);
    let q = with_opt(query(0x67, "e.allowed.test", TYPE_A));
    let (_, fwd) = h.forward(0, &q);
    assert_eq!(&fwd[2..], &q[2..]);
    assert!(wire::parse_query(&fwd).unwrap().opt.is_some());
}

#[test]
fn flow_records_only_when_asked_for() {
    let mut h = Harness::new(config());
    h.query(0, CLIENT, &query(1, "evil.example.com", TYPE_A));
    assert!(h.core.poll_record().is_none(), "no flow records by default");

    let mut c = config();
    c.flow_records = true;
    let mut h = Harness::new(c);
    h.query(0, CLIENT, &query(1, "Evil.Example.com", TYPE_A));
    h.query(0, CLIENT, &[0u8; 5]);
    let (socket, fwd) = h.forward(0, &query(2, "f.allowed.test", TYPE_A));
    let id = u16::from_be_bytes([fwd[0], fwd[1]]);
    let ans = answer(
        id,
        "f.allowed.test",
        TYPE_A,
        &[("f.allowed.test", TYPE_A, 60, &rdata_a("127.0.0.12"))],
    );
    h.answer(7, socket, &ans);
    let flows: Vec<_> = std::iter::from_fn(|| h.core.poll_record())
        .filter_map(|r| match r {
            Record::Flow(f) => Some(f),
            Record::Addresses(_) => None,
        })
        .collect();
    let summary: Vec<_> = flows
        .iter()
        .map(|f| (f.name.to_string(), f.verdict, f.rcode))
        .collect();
    use dnsfence_engine::core::Verdict;
    assert_eq!(
        summary,
        [
            ("evil.example.com.".to_owned(), Verdict::Refuse, Some(5)),
            (".".to_owned(), Verdict::Malformed, None),
            ("f.allowed.test.".to_owned(), Verdict::Forward, Some(0)),
        ]
    );
    assert_eq!(flows[2].upstream_latency, Some(Duration::from_millis(7)));
    assert_eq!(flows[2].endpoint, Some(ep()));
}

#[test]
fn allow_entries_follow_the_workload_across_a_reload_that_renumbers_endpoints() {
    // Two restricted workloads; the reload lists them in the other order, so their
    // `EndpointId`s swap. Allow entries and the shard's memory of them must follow the
    // workload (its `EndpointKey`), never the index.
    let endpoints = |first: (&str, &str), second: (&str, &str)| {
        format!(
            "endpoints:\n- name: {}\n  labels: {{app: client}}\n  ips: [\"{}\"]\n- name: {}\n  labels: {{app: client}}\n  ips: [\"{}\"]\n",
            first.0, first.1, second.0, second.1
        )
    };
    let snapshot = |eps: &str| {
        let dir = write_dir(
            "reorder",
            &[("policy.yaml", POLICY), ("endpoints.yaml", eps)],
        );
        let s = dnsfence_policy::load_on(
            &[dir.join("policy.yaml")],
            Some(&dir.join("endpoints.yaml")),
            &test_node(),
        )
        .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        Arc::new(s)
    };
    let payments = ("payments", "127.0.0.30");
    let untrusted = ("untrusted", "127.0.0.31");
    let mut h = Harness::new(config());
    h.core
        .set_snapshot(snapshot(&endpoints(payments, untrusted)));
    let ask = |h: &mut Harness, ms: u64, from: &str, id: u16| {
        let out = h.query(ms, from, &query(id, "pay.allowed.test", TYPE_A));
        let (Destination::UpstreamUdp { socket }, fwd) = &out[0] else {
            panic!("{out:?}")
        };
        let upstream_id = u16::from_be_bytes([fwd[0], fwd[1]]);
        let ans = answer(
            upstream_id,
            "pay.allowed.test",
            TYPE_A,
            &[("pay.allowed.test", TYPE_A, 600, &rdata_a("127.0.0.77"))],
        );
        h.core.handle_upstream(h.at(ms), *socket, upstream(), &ans);
        h.drain(ms)
    };
    ask(&mut h, 0, "127.0.0.30:1000", 1);
    let key = |who: (&str, &str)| EndpointKey::of("default", who.0);
    assert!(allowed_443(
        &h.table,
        key(payments),
        ip("127.0.0.77"),
        h.at(1)
    ));
    assert!(!allowed_443(
        &h.table,
        key(untrusted),
        ip("127.0.0.77"),
        h.at(1)
    ));

    h.core
        .set_snapshot(snapshot(&endpoints(untrusted, payments)));
    assert!(
        !allowed_443(&h.table, key(untrusted), ip("127.0.0.77"), h.at(2)),
        "the reload handed payments' entry to untrusted"
    );
    // untrusted now resolves the name itself: its own entry must be written (the shard must
    // not take payments' entry, now under the same index, for untrusted's).
    let writes = h.core.stats().allow_writes;
    ask(&mut h, 3, "127.0.0.31:1000", 2);
    assert_eq!(h.core.stats().allow_writes, writes + 1);
    assert!(allowed_443(
        &h.table,
        key(untrusted),
        ip("127.0.0.77"),
        h.at(4)
    ));
}

#[test]
fn edns_payload_size_is_clamped_to_what_the_shard_receives() {
    let mut c = config();
    c.max_udp_payload = 1232;
    let mut h = Harness::new(c);
    let mut q = with_opt(query(0x68, "big.allowed.test", TYPE_A));
    let n = q.len();
    q[n - 8..n - 6].copy_from_slice(&8192u16.to_be_bytes());
    let (_, fwd) = h.forward(0, &q);
    assert_eq!(&fwd[n - 8..n - 6], &1232u16.to_be_bytes());
    // A smaller size is left alone.
    let q = with_opt(query(0x69, "small.allowed.test", TYPE_A));
    let mut small = q.clone();
    let n = small.len();
    small[n - 8..n - 6].copy_from_slice(&512u16.to_be_bytes());
    let (_, fwd) = h.forward(0, &small);
    assert_eq!(&fwd[n - 8..n - 6], &512u16.to_be_bytes());
}

#[test]
fn repeated_wrong_question_answers_give_the_query_up() {
    let mut h = Harness::new(config());
    let q = query(0x70, "g.allowed.test", TYPE_A);
    let (socket, fwd) = h.forward(0, &q);
    let id = u16::from_be_bytes([fwd[0], fwd[1]]);
    let evil = [("guess.allowed.test", TYPE_A, 300, &rdata_a("127.6.6.6")[..])];
    for i in 0..2 {
        let spoof = answer(id, &format!("guess{i}.allowed.test"), TYPE_A, &evil);
        assert!(h.answer(1, socket, &spoof).is_empty());
    }
    let spoof = answer(id, "guess2.allowed.test", TYPE_A, &evil);
    let out = h.answer(1, socket, &spoof);
    assert_eq!(rcode(to_client(&out)), Rcode::ServFail as u8);
    assert_eq!(h.core.stats().spoofing_suspected, 1);
    assert_eq!(h.core.in_flight(), 0);
    assert!(!allowed_443(&h.table, ep(), ip("127.6.6.6"), h.at(2)));
}

#[test]
fn an_old_snapshot_is_released_when_its_last_query_is_done() {
    let old = Arc::new(test_snapshot());
    let mut h = Harness::new(config());
    h.core.set_snapshot(Arc::clone(&old));
    let (socket, fwd) = h.forward(0, &query(0x41, "o.allowed.test", TYPE_A));
    h.core.set_snapshot(Arc::new(deny_all_snapshot()));
    assert!(
        Arc::strong_count(&old) > 1,
        "the query in flight keeps its snapshot"
    );
    let id = u16::from_be_bytes([fwd[0], fwd[1]]);
    let ans = answer(
        id,
        "o.allowed.test",
        TYPE_A,
        &[("o.allowed.test", TYPE_A, 60, &rdata_a("127.0.0.41"))],
    );
    h.answer(1, socket, &ans);
    assert_eq!(Arc::strong_count(&old), 1, "released after the answer");
}

#[test]
fn max_ttl_caps_huge_ttls() {
    let mut h = Harness::new(config());
    let (socket, fwd) = h.forward(0, &query(9, "y.allowed.test", TYPE_A));
    let id = u16::from_be_bytes([fwd[0], fwd[1]]);
    let ans = answer(
        id,
        "y.allowed.test",
        TYPE_A,
        &[(
            "y.allowed.test",
            TYPE_A,
            i32::MAX as u32,
            &rdata_a("127.0.0.6"),
        )],
    );
    let out = h.answer(1, socket, &ans);
    // The client may not cache the address longer than its entry lives: the answer's TTL
    // is lowered to the cap (it used to reach the client as 68 years, the entry 36 hours).
    let reply = to_client(&out);
    let ttl_at = reply.len() - 4 - 2 - 4;
    assert_eq!(reply[ttl_at..ttl_at + 4], 86_400u32.to_be_bytes());
    assert_eq!(h.core.stats().ttl_clamped, 1);
    // 86,400 s plus half of it as headroom.
    assert!(allowed_443(
        &h.table,
        ep(),
        ip("127.0.0.6"),
        h.at(129_000_000)
    ));
    assert!(!allowed_443(
        &h.table,
        ep(),
        ip("127.0.0.6"),
        h.at(129_600_002)
    ));
}

/// Answers that open nothing are capped as well: a truncated answer's records and an
/// NXDOMAIN's CNAME reach the client with at most --max-ttl.
#[test]
fn max_ttl_caps_answers_that_open_nothing() {
    let mut h = Harness::new(config());
    for (i, (flags, rcode_bits)) in [(0x02u8, 0u8), (0x00, 3)].into_iter().enumerate() {
        let name = format!("t{i}.allowed.test");
        let (socket, fwd) = h.forward(0, &query(i as u16, &name, TYPE_A));
        let id = u16::from_be_bytes([fwd[0], fwd[1]]);
        let target = rdata_name("gone.example");
        let mut ans = answer(
            id,
            &name,
            TYPE_A,
            &[(&name, TYPE_CNAME, 604_800, target.as_slice())],
        );
        ans[2] |= flags; // TC
        ans[3] |= rcode_bits;
        let out = h.answer(1, socket, &ans);
        let reply = to_client(&out);
        assert_eq!(rcode(reply), rcode_bits);
        let ttl_at = reply.len() - target.len() - 2 - 4;
        assert_eq!(
            reply[ttl_at..ttl_at + 4],
            86_400u32.to_be_bytes(),
            "answer {i}"
        );
    }
    assert_eq!(h.core.stats().ttl_clamped, 2);
}

/// The answer the upstream would send to forwarded query `fwd`: its ID and question as sent
/// (case kept), one A record.
fn echo_answer(fwd: &[u8], ip_addr: &str) -> Vec<u8> {
    let q = wire::parse_query(fwd).unwrap();
    let mut a = answer(0, "x", TYPE_A, &[]);
    a.truncate(12);
    a[0..2].copy_from_slice(&fwd[0..2]);
    a[7] = 1;
    a.extend_from_slice(&fwd[12..q.question_end]);
    a.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
    a.extend_from_slice(&rdata_a(ip_addr));
    a
}

/// The same answer with the question spelled as the client did.
fn with_spelling(answer: &[u8], spelled: &[u8]) -> Vec<u8> {
    let mut a = answer.to_vec();
    a[12..12 + spelled.len()].copy_from_slice(spelled);
    a
}

#[test]
fn upstream_0x20_is_on_by_default() {
    let c = CoreConfig::new(upstream());
    assert!(c.upstream_0x20 && c.upstream_0x20_fallback);
    assert!(c.upstream_socket_queries > 0 && c.upstream_socket_queries <= 512);
    assert!(c.upstream_unknown_id_burst > 0);
}

#[test]
fn upstream_0x20_accepts_only_the_spelling_it_sent() {
    let mut c = config();
    c.upstream_0x20 = true;
    let mut h = Harness::new(c);
    // A first exchange shows the upstream preserves case.
    let (socket, fwd) = h.forward(0, &query(1, "first.allowed.test", TYPE_A));
    assert_eq!(
        rcode(to_client(&h.answer(
            0,
            socket,
            &echo_answer(&fwd, "127.0.0.43")
        ))),
        0
    );
    let name = "averyveryverylongnamewithmanyletters.allowed.test";
    let q = query(0x7e, name, TYPE_A);
    let (socket, fwd) = h.forward(0, &q);
    let sent = &fwd[12..12 + name.len() + 2];
    assert!(sent.eq_ignore_ascii_case(&q[12..12 + name.len() + 2]));
    assert_ne!(
        sent,
        &q[12..12 + name.len() + 2],
        "case randomised (2^-44 flake)"
    );
    let real = echo_answer(&fwd, "127.0.0.44");
    // An answer with the client's spelling (what a spoofer who saw the client's query, but not
    // ours, would send) is not accepted, and the query still waits for the real one.
    let wrong = with_spelling(&real, &q[12..12 + sent.len()]);
    assert!(h.answer(1, socket, &wrong).is_empty());
    assert_eq!(h.core.stats().upstream_wrong_question, 1);
    assert_eq!(h.core.stats().upstream_case_mismatch, 1);
    // The real answer echoes our spelling; the client gets its own back.
    let out = h.answer(2, socket, &real);
    let reply = to_client(&out);
    assert_eq!(rcode(reply), 0);
    assert_eq!(&reply[12..12 + sent.len()], &q[12..12 + sent.len()]);
    assert_eq!(h.core.stats().upstream_0x20_disabled, 0);
}

#[test]
fn upstream_that_does_not_preserve_case_falls_back_after_a_few_answers() {
    let mut c = config();
    c.upstream_0x20 = true;
    let mut h = Harness::new(c);
    let lower = |fwd: &[u8]| {
        let mut a = echo_answer(fwd, "127.0.0.45");
        a[12..].make_ascii_lowercase();
        a
    };
    // Until the fallback each such answer is a SERVFAIL at once (not a 2 s timeout).
    for i in 0..dnsfence_engine::core::CASE_FALLBACK_AFTER {
        let name = format!("mixedcase{i}.allowed.test");
        let (socket, fwd) = h.forward(u64::from(i), &query(i as u16, &name, TYPE_A));
        assert_ne!(
            &fwd[12..20],
            b"\x0amixedca",
            "sent in 0x20 case (2^-7 flake)"
        );
        let out = h.answer(u64::from(i), socket, &lower(&fwd));
        assert_eq!(rcode(to_client(&out)), Rcode::ServFail as u8);
    }
    let s = h.core.stats();
    assert_eq!(
        s.case_mismatch_failed,
        u64::from(dnsfence_engine::core::CASE_FALLBACK_AFTER)
    );
    assert_eq!(s.upstream_0x20_disabled, 1);
    // Now names go as the client spelled them, and lowercase answers are accepted.
    let q = query(9, "lowercase.allowed.test", TYPE_A);
    let (socket, fwd) = h.forward(10, &q);
    assert_eq!(&fwd[12..], &q[12..]);
    assert_eq!(rcode(to_client(&h.answer(10, socket, &lower(&fwd)))), 0);
}

#[test]
fn one_exact_echo_disables_the_fallback_for_good() {
    let mut c = config();
    c.upstream_0x20 = true;
    let mut h = Harness::new(c);
    let (socket, fwd) = h.forward(0, &query(1, "exact.allowed.test", TYPE_A));
    h.answer(0, socket, &echo_answer(&fwd, "127.0.0.46"));
    // A spoofer who guesses IDs but not the spelling: never switches 0x20 off, never answers.
    for i in 0..20u16 {
        let name = format!("target{i}.allowed.test");
        let q = query(i, &name, TYPE_A);
        let (socket, fwd) = h.forward(1, &q);
        let forged = with_spelling(&echo_answer(&fwd, "6.6.6.6"), &q[12..12 + name.len() + 2]);
        assert!(
            h.answer(1, socket, &forged).is_empty(),
            "forgery {i} accepted"
        );
    }
    let s = h.core.stats();
    assert_eq!(s.upstream_0x20_disabled, 0);
    assert_eq!(s.case_mismatch_failed, 0);
    assert_eq!(s.upstream_case_mismatch, 20);
    assert!(!allowed_443(&h.table, ep(), ip("6.6.6.6"), h.at(2)));
}

/// An exact echo proves that the upstream preserves case only for a spelling a lowercasing
/// upstream would have changed: a name without letters (asked by an unrestricted client)
/// echoed by such an upstream does not lock the fallback off.
#[test]
fn an_echo_without_mixed_case_proves_nothing() {
    let mut c = config();
    c.upstream_0x20 = true;
    let mut h = Harness::new(c);
    let lowercased = |fwd: &[u8]| {
        let mut a = echo_answer(fwd, "127.0.0.48");
        a[12..].make_ascii_lowercase();
        a
    };
    let digits = query(0x51, "1.2.3.4.5", TYPE_A);
    let out = h.query(0, OPEN_CLIENT, &digits);
    let [(Destination::UpstreamUdp { socket }, fwd)] = out.as_slice() else {
        panic!("expected a forward: {out:?}");
    };
    assert_eq!(
        h.answer(0, *socket, &lowercased(fwd)).len(),
        1,
        "answered to the client"
    );
    // The lowercasing upstream still gets its fallback.
    for i in 0..dnsfence_engine::core::CASE_FALLBACK_AFTER {
        let name = format!("mixedcase{i}.allowed.test");
        let (socket, fwd) = h.forward(u64::from(i), &query(i as u16, &name, TYPE_A));
        h.answer(u64::from(i), socket, &lowercased(&fwd));
    }
    assert_eq!(h.core.stats().upstream_0x20_disabled, 1);
    assert!(wire::has_mixed_case(b"\x03aBc\x00"));
    assert!(!wire::has_mixed_case(b"\x03abc\x01\x31\x00"));
    assert!(!wire::has_mixed_case(b"\x03ABC\x00"));
}

#[test]
fn upstream_0x20_on_without_fallback_never_switches_off() {
    let mut c = config();
    c.upstream_0x20 = true;
    c.upstream_0x20_fallback = false;
    let mut h = Harness::new(c);
    for i in 0..10u16 {
        let (socket, fwd) = h.forward(0, &query(i, &format!("n{i}.allowed.test"), TYPE_A));
        let mut a = echo_answer(&fwd, "127.0.0.47");
        a[12..].make_ascii_lowercase();
        h.answer(0, socket, &a);
    }
    assert_eq!(h.core.stats().upstream_0x20_disabled, 0);
    let (_, fwd) = h.forward(0, &query(99, "stillmixed.allowed.test", TYPE_A));
    assert_ne!(&fwd[12..24], b"\x0astillmixe", "still 0x20 (2^-10 flake)");
}

/// Replaces every socket the core asks to, as the shard does; returns the transmits after.
fn replace_all(h: &mut Harness, ok: bool) -> (Vec<u16>, Vec<(Destination, Vec<u8>)>) {
    let mut replaced = Vec::new();
    while let Some(socket) = h.core.poll_replace() {
        h.core.upstream_replaced(socket, ok);
        replaced.push(socket);
    }
    (replaced, h.transmits())
}

#[test]
fn upstream_sockets_rotate_after_their_query_quota() {
    let mut c = config();
    c.upstream_sockets = 2;
    c.upstream_socket_queries = 3;
    let mut h = Harness::new(c);
    let mut fwds = Vec::new();
    // Six queries fill both sockets' quota; no socket takes a fourth.
    for i in 0..6u16 {
        fwds.push(h.forward(0, &query(i, &format!("r{i}.allowed.test"), TYPE_A)));
    }
    for socket in 0..2 {
        assert_eq!(fwds.iter().filter(|(s, _)| *s == socket).count(), 3);
    }
    // Nothing is replaced while its queries are in flight (their answers come to this port).
    assert_eq!(h.core.poll_replace(), None);
    for (socket, fwd) in &fwds[..5] {
        h.answer(1, *socket, &echo_answer(fwd, "127.0.0.48"));
    }
    let last = fwds[5].0;
    let (replaced, out) = replace_all(&mut h, true);
    assert_eq!(replaced, vec![1 - last], "the drained socket only");
    assert!(out.is_empty(), "nothing to re-send");
    // The last answer drains the other one.
    h.answer(1, last, &echo_answer(&fwds[5].1, "127.0.0.48"));
    assert_eq!(replace_all(&mut h, true).0, vec![last]);
    assert_eq!(h.core.stats().upstream_sockets_rotated, 2);
    assert_eq!(h.core.stats().upstream_resent, 0);
    // Both are back in service with a fresh quota.
    let mut used = [0; 2];
    for i in 0..6u16 {
        used[usize::from(
            h.forward(2, &query(i, &format!("s{i}.allowed.test"), TYPE_A))
                .0,
        )] += 1;
    }
    assert_eq!(used, [3, 3]);
}

#[test]
fn a_retiring_socket_is_replaced_after_a_grace_and_its_queries_resent() {
    let mut c = config();
    c.upstream_sockets = 1;
    c.upstream_socket_queries = 2;
    c.upstream_0x20 = true;
    let mut h = Harness::new(c);
    let (_, slow) = h.forward(0, &query(1, "slow.allowed.test", TYPE_A));
    let (_, fast) = h.forward(0, &query(2, "fast.allowed.test", TYPE_A));
    h.answer(1, 0, &echo_answer(&fast, "127.0.0.49"));
    // With all sockets retiring, a new query still goes out (on the retiring one).
    let (_, third) = h.forward(2, &query(3, "third.allowed.test", TYPE_A));
    assert_eq!(h.core.stats().upstream_socket_overrun, 1);
    h.core.handle_timeout(h.at(100));
    assert_eq!(h.core.poll_replace(), None, "within the grace");
    h.core.handle_timeout(h.at(600));
    let (replaced, out) = replace_all(&mut h, true);
    assert_eq!(replaced, vec![0]);
    // The queries in flight go again from the new socket: same ID, same spelling.
    let resent: Vec<&Vec<u8>> = out.iter().map(|(_, b)| b).collect();
    assert_eq!(resent, vec![&slow, &third]);
    assert!(
        out.iter()
            .all(|(d, _)| *d == Destination::UpstreamUdp { socket: 0 })
    );
    assert_eq!(h.core.stats().upstream_resent, 2);
    // And their answers (to the new port) are accepted.
    assert_eq!(
        rcode(to_client(&h.answer(
            700,
            0,
            &echo_answer(&slow, "127.0.0.50")
        ))),
        0
    );
}

#[test]
fn a_failed_replacement_keeps_the_old_socket_in_service() {
    let mut c = config();
    c.upstream_sockets = 1;
    c.upstream_socket_queries = 1;
    let mut h = Harness::new(c);
    let (_, fwd) = h.forward(0, &query(1, "one.allowed.test", TYPE_A));
    h.answer(0, 0, &echo_answer(&fwd, "127.0.0.51"));
    let (replaced, out) = replace_all(&mut h, false);
    assert_eq!((replaced, out.len()), (vec![0], 0));
    assert_eq!(h.core.stats().upstream_socket_replace_failed, 1);
    h.forward(1, &query(2, "two.allowed.test", TYPE_A));
}

/// A socket under attack whose replacement failed keeps its count of unknown IDs: the next
/// forged answer asks for a replacement again (not 32 more), and the quota still holds.
#[test]
fn a_failed_replacement_gives_a_guesser_no_fresh_budget() {
    let mut c = config();
    c.upstream_sockets = 1;
    c.upstream_unknown_id_burst = 4;
    let mut h = Harness::new(c);
    let (socket, fwd) = h.forward(0, &query(1, "target.allowed.test", TYPE_A));
    let id = u16::from_be_bytes([fwd[0], fwd[1]]);
    let forge = |guess: u16| {
        let mut forged = echo_answer(&fwd, "6.6.6.6");
        forged[0..2].copy_from_slice(&guess.to_be_bytes());
        forged
    };
    let mut guesses = (0..=u16::MAX).filter(|&g| g != id);
    for guess in guesses.by_ref().take(4) {
        h.answer(1, socket, &forge(guess));
    }
    let (replaced, _) = replace_all(&mut h, false);
    assert_eq!(replaced, vec![socket]);
    assert_eq!(h.core.stats().upstream_socket_replace_failed, 1);
    // Still in service: the query in flight is answered from the old port.
    h.answer(2, socket, &forge(guesses.next().unwrap()));
    let (replaced, _) = replace_all(&mut h, true);
    assert_eq!(replaced, vec![socket], "one more guess asks again");
    assert_eq!(h.core.stats().upstream_sockets_attacked, 1);
    let out = h.answer(3, socket, &echo_answer(&fwd, "127.0.0.53"));
    assert_eq!(rcode(to_client(&out)), 0);
}

/// A query forwarded in the turn its socket is replaced (its transmit still queued) goes out
/// once, from the new port, not twice.
#[test]
fn a_query_queued_when_its_socket_is_replaced_goes_once() {
    let mut c = config();
    c.upstream_sockets = 1;
    c.upstream_unknown_id_burst = 2;
    let mut h = Harness::new(c);
    let (_, fwd) = h.forward(0, &query(1, "first.allowed.test", TYPE_A));
    let id = u16::from_be_bytes([fwd[0], fwd[1]]);
    // Queued, not drained: the shard replaces sockets before it drains transmits.
    h.core.handle_client(
        h.at(1),
        Client::Udp(CLIENT.parse().unwrap()),
        None,
        &query(2, "second.allowed.test", TYPE_A),
    );
    for guess in [id.wrapping_add(1), id.wrapping_add(2)] {
        let mut forged = echo_answer(&fwd, "6.6.6.6");
        forged[0..2].copy_from_slice(&guess.to_be_bytes());
        h.core.handle_upstream(h.at(1), 0, upstream(), &forged);
    }
    let (replaced, out) = replace_all(&mut h, true);
    assert_eq!(replaced, vec![0]);
    let mut names: Vec<String> = out
        .iter()
        .map(|(_, b)| String::from_utf8_lossy(&b[13..18]).to_ascii_lowercase())
        .collect();
    names.sort();
    assert_eq!(names, ["first", "secon"], "{out:?}");
}

#[test]
fn a_burst_of_unknown_ids_retires_the_socket_at_once() {
    let mut c = config();
    c.upstream_sockets = 2;
    c.upstream_unknown_id_burst = 32;
    c.upstream_0x20 = true;
    let mut h = Harness::new(c);
    let q = query(1, "target.allowed.test", TYPE_A);
    let (socket, fwd) = h.forward(0, &q);
    let id = u16::from_be_bytes([fwd[0], fwd[1]]);
    // A spoofer walks the ID space on that socket's port, in the client's spelling.
    let client_question = &q[12..];
    let forge = |guess: u16| {
        let mut forged = with_spelling(&echo_answer(&fwd, "6.6.6.6"), client_question);
        forged[0..2].copy_from_slice(&guess.to_be_bytes());
        forged
    };
    let mut guesses = (0..=u16::MAX).filter(|&g| g != id);
    for guess in guesses.by_ref().take(31) {
        assert!(h.answer(1, socket, &forge(guess)).is_empty());
    }
    assert_eq!(
        h.core.poll_replace(),
        None,
        "31 stray answers are tolerated"
    );
    assert!(
        h.answer(1, socket, &forge(guesses.next().unwrap()))
            .is_empty()
    );
    assert_eq!(h.core.stats().upstream_unknown_id, 32);
    assert_eq!(h.core.stats().upstream_sockets_attacked, 1);
    // Retired: no new query goes there, and it is replaced now, its query re-sent.
    let (other, _) = h.forward(2, &query(2, "other.allowed.test", TYPE_A));
    assert_ne!(other, socket);
    let (replaced, out) = replace_all(&mut h, true);
    assert_eq!(replaced, vec![socket]);
    assert_eq!(
        out,
        vec![(Destination::UpstreamUdp { socket }, fwd.clone())]
    );
    // The real answer (to the new port) wins.
    let out = h.answer(3, socket, &echo_answer(&fwd, "127.0.0.52"));
    assert_eq!(rcode(to_client(&out)), 0);
    assert!(allowed_443(&h.table, ep(), ip("127.0.0.52"), h.at(4)));
    assert!(!allowed_443(&h.table, ep(), ip("6.6.6.6"), h.at(4)));
}

#[test]
fn an_icmp_unreachable_fails_that_sockets_queries_at_once() {
    let mut c = config();
    c.upstream_sockets = 2;
    let mut h = Harness::new(c);
    let mut fwds = Vec::new();
    for i in 0..8u16 {
        fwds.push(h.forward(0, &query(i, &format!("u{i}.allowed.test"), TYPE_A)));
    }
    let on = |s: u16| fwds.iter().filter(|(x, _)| *x == s).count();
    h.core.handle_upstream_error(h.at(1), 0);
    let out = h.drain(1);
    assert_eq!(out.len(), on(0));
    assert!(out.iter().all(|(_, r)| rcode(r) == Rcode::ServFail as u8));
    assert_eq!(h.core.stats().upstream_unreachable, on(0) as u64);
    assert_eq!(h.core.in_flight(), on(1));
    // The other socket's queries are untouched and still answered.
    let (socket, fwd) = fwds.iter().find(|(s, _)| *s == 1).unwrap();
    assert_eq!(
        rcode(to_client(&h.answer(
            2,
            *socket,
            &echo_answer(fwd, "127.0.0.53")
        ))),
        0
    );
}

#[test]
fn dropped_sends_are_counted_in_the_core() {
    let mut h = Harness::new(config());
    h.core.sends_dropped(3, 2);
    assert_eq!(h.core.stats().client_sends_dropped, 3);
    assert_eq!(h.core.stats().upstream_sends_dropped, 2);
}

#[test]
fn one_endpoint_cannot_take_the_whole_pending_table() {
    let mut c = config();
    c.max_pending = 64;
    c.max_pending_per_endpoint = 16;
    let mut h = Harness::new(c);
    // `client` floods names its upstream never answers: 16 in flight, then SERVFAIL.
    let mut servfail = 0;
    for i in 0..40u16 {
        let out = h.query(
            0,
            CLIENT,
            &query(i, &format!("slow{i}.allowed.test"), TYPE_A),
        );
        if matches!(out[0].0, Destination::Client(_)) {
            assert_eq!(rcode(&out[0].1), Rcode::ServFail as u8);
            servfail += 1;
        }
    }
    assert_eq!(servfail, 24);
    assert_eq!(h.core.in_flight(), 16);
    // Another endpoint still gets through.
    let out = h.query(0, OPEN_CLIENT, &query(1, "anything.example", TYPE_A));
    assert!(
        matches!(out[0].0, Destination::UpstreamUdp { .. }),
        "{out:?}"
    );
    // After the timeouts the flooding endpoint has its share back.
    h.core.handle_timeout(h.at(2000));
    h.drain(2000);
    h.forward(2001, &query(99, "again.allowed.test", TYPE_A));
}

/// Review finding: the per-endpoint quota alone (default: half the table) let two endpoints
/// take every slot. Each endpoint also stops at its fair share: it holds fewer than are free.
#[test]
fn endpoints_flooding_together_leave_a_share_free() {
    let mut c = config();
    c.max_pending = 64;
    c.max_pending_per_endpoint = 64;
    let mut h = Harness::new(c);
    let flood = |h: &mut Harness, client: &str, name: &str| {
        for i in 0..100u16 {
            h.query(0, client, &query(i, &format!("s{i}.{name}"), TYPE_A));
        }
    };
    flood(&mut h, CLIENT, "allowed.test");
    assert_eq!(h.core.in_flight(), 32, "one endpoint: half the table");
    flood(&mut h, OPEN_CLIENT, "example");
    assert_eq!(h.core.in_flight(), 48, "two: a third each, a third free");
    // The first one, even now, takes no more.
    let out = h.query(0, CLIENT, &query(999, "more.allowed.test", TYPE_A));
    assert_eq!(rcode(&out[0].1), Rcode::ServFail as u8);
    assert_eq!(h.core.in_flight(), 48);
    let s = h.core.stats();
    assert_eq!(s.pending_fair_share, s.pending_full, "{s:?}");
    assert!(s.pending_fair_share > 0);
}

#[test]
fn a_reload_does_not_renew_an_endpoints_share() {
    let mut c = config();
    c.max_pending = 64;
    c.max_pending_per_endpoint = 4;
    let mut h = Harness::new(c);
    for round in 0..4u16 {
        for i in 0..10u16 {
            let id = round * 10 + i;
            h.query(
                0,
                CLIENT,
                &query(id, &format!("s{id}.allowed.test"), TYPE_A),
            );
        }
        // The same policy again: the flooding endpoint keeps its count.
        h.core.set_snapshot(Arc::new(test_snapshot()));
    }
    assert_eq!(h.core.in_flight(), 4);
    // All expire; the share is whole again.
    h.core.handle_timeout(h.at(2000));
    h.drain(2000);
    assert_eq!(h.core.in_flight(), 0);
    for i in 0..4u16 {
        h.forward(2001, &query(100 + i, &format!("t{i}.allowed.test"), TYPE_A));
    }
}

#[test]
fn edns_payload_is_clamped_when_opt_is_not_the_only_additional_record() {
    let mut c = config();
    c.max_udp_payload = 1232;
    let mut h = Harness::new(c);
    // Question, then ARCOUNT 2: an OPT advertising 65535 and a TSIG-like dummy record.
    let mut q = query(0x71, "two.allowed.test", TYPE_A);
    q[11] = 2;
    let opt_at = q.len();
    q.extend_from_slice(&[0, 0, 41, 0xff, 0xff, 0, 0, 0, 0, 0, 0]);
    q.extend_from_slice(&[0, 0, 16, 0, 1, 0, 0, 0, 0, 0, 1, b'x']);
    let (_, fwd) = h.forward(0, &q);
    assert_eq!(&fwd[opt_at + 3..opt_at + 5], &1232u16.to_be_bytes());
    assert_eq!(fwd.len(), opt_at + 11, "the other record is not forwarded");
    assert_eq!(&fwd[10..12], &[0, 1]);
}

#[test]
fn forwarded_queries_carry_no_record_but_a_minimal_opt() {
    let mut h = Harness::new(config());
    // An answer and an authority record (a query has no business carrying them), then an
    // additional A record and an OPT with a client cookie and DO set.
    let mut q = query(0x72, "rec.allowed.test", TYPE_A);
    let question_end = q.len();
    q[7] = 1;
    q[9] = 1;
    q[11] = 2;
    for _ in 0..3 {
        q.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 6, 6, 6, 6]);
    }
    q.truncate(q.len() - 16);
    q.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 6, 6, 6, 6]);
    q.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0x80, 0, 0, 12]);
    q.extend_from_slice(&[0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
    let (_, fwd) = h.forward(0, &q);
    assert_eq!(&fwd[4..12], &[0, 1, 0, 0, 0, 0, 0, 1]);
    assert_eq!(&fwd[12..question_end], &q[12..question_end]);
    assert_eq!(
        &fwd[question_end..],
        &[0, 0, 41, 0x04, 0xd0, 0, 0, 0x80, 0, 0, 0],
        "one minimal OPT: payload and DO kept, cookie dropped"
    );
    // Without OPT: no record at all.
    let mut q = query(0x73, "rec2.allowed.test", TYPE_A);
    q[11] = 1;
    q.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 6, 6, 6, 6]);
    let (_, fwd) = h.forward(0, &q);
    assert_eq!(fwd.len(), q.len() - 16);
    assert_eq!(&fwd[6..12], &[0; 6]);
}

#[test]
fn formerr_and_notimp_carry_a_minimal_opt_when_the_opt_can_be_found() {
    let mut h = Harness::new(config());
    let minimal = [0, 0, 41, 0x10, 0, 0, 0, 0x80, 0, 0, 0];
    let opt_with_cookie = |mut q: Vec<u8>| {
        q[11] = 1;
        q.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0x80, 0, 0, 12]);
        q.extend_from_slice(&[0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
        q
    };
    // Unknown class, opcode STATUS (NOTIMP), no question: the OPT is found.
    let mut class = opt_with_cookie(query(1, "a.allowed.test", TYPE_A));
    class[12 + 16 + 3] = 9;
    let mut opcode = opt_with_cookie(query(2, "a.allowed.test", TYPE_A));
    opcode[2] |= 0x10;
    let mut none = query(3, "x", TYPE_A);
    none.truncate(12);
    none[5] = 0;
    let none = opt_with_cookie(none);
    for (q, rc) in [
        (class, Rcode::FormErr),
        (opcode, Rcode::NotImp),
        (none, Rcode::FormErr),
    ] {
        let reply = to_client(&h.query(0, CLIENT, &q)).to_vec();
        assert_eq!(rcode(&reply), rc as u8);
        assert_eq!(reply.len(), 12 + 11, "{reply:02x?}");
        assert_eq!(&reply[4..12], &[0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(&reply[12..], &minimal);
    }
    // Two questions: the layout cannot be trusted, the header alone.
    let mut two = opt_with_cookie(query(4, "a.allowed.test", TYPE_A));
    two[5] = 2;
    let reply = to_client(&h.query(0, CLIENT, &two)).to_vec();
    assert_eq!((rcode(&reply), reply.len()), (Rcode::FormErr as u8, 12));
}

#[test]
fn local_replies_carry_a_minimal_opt_without_the_clients_cookie() {
    let mut c = config();
    c.upstream_timeout = Duration::from_millis(100);
    let mut h = Harness::new(c);
    let cookie_opt = |mut q: Vec<u8>| {
        q[11] = 1;
        q.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 12]);
        q.extend_from_slice(&[0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
        q
    };
    let minimal = [0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0];
    // REFUSED written in place.
    let q = cookie_opt(query(0x74, "evil.example", TYPE_A));
    let reply = to_client(&h.query(0, CLIENT, &q)).to_vec();
    assert_eq!(rcode(&reply), Rcode::Refused as u8);
    assert_eq!(&reply[10..12], &[0, 1]);
    assert_eq!(&reply[reply.len() - 11..], &minimal);
    assert_eq!(reply.len(), q.len() - 12);
    // SERVFAIL from the pending table (timeout).
    let q = cookie_opt(query(0x75, "late.allowed.test", TYPE_A));
    h.forward(0, &q);
    h.core.handle_timeout(h.at(200));
    let out = h.drain(200);
    let reply = to_client(&out);
    assert_eq!(rcode(reply), Rcode::ServFail as u8);
    assert_eq!(&reply[10..12], &[0, 1]);
    assert_eq!(&reply[reply.len() - 11..], &minimal);
    assert_eq!(reply.len(), q.len() - 12);
    // No OPT in the query, none in the reply.
    let q = query(0x76, "late2.allowed.test", TYPE_A);
    h.forward(300, &q);
    h.core.handle_timeout(h.at(500));
    let out = h.drain(500);
    assert_eq!(to_client(&out).len(), q.len());
}

/// Review finding (fixed): an address answered for two names is written for each (the
/// shard's memory of written entries is keyed by name too), so the ledger remembers both and
/// a reload that drops the first name keeps what the second still justifies. Failed when
/// the memory ignored names (the second answer never reached the ledger).
#[test]
fn a_reload_keeps_an_address_another_allowed_name_answered() {
    // The test policy with a second toFQDNs name on 443/TCP.
    let two_names = POLICY
        .replace(
            r#"{matchName: "api.stripe.com"}"#,
            r#"{matchPattern: "*.kept.test"}"#,
        )
        .replace(
            r#"toFQDNs: [{matchPattern: "*.allowed.test"}]"#,
            r#"toFQDNs: [{matchPattern: "*.allowed.test"}, {matchPattern: "*.kept.test"}]"#,
        );
    assert_eq!(two_names.matches("kept.test").count(), 2);
    let both = Arc::new(snapshot_of(&two_names));
    let kept_only = Arc::new(snapshot_of(&two_names.replace(
        r#"toFQDNs: [{matchPattern: "*.allowed.test"}, {matchPattern: "*.kept.test"}]"#,
        r#"toFQDNs: [{matchPattern: "*.kept.test"}]"#,
    )));
    let mut h = Harness::new(config());
    h.table.revoke(Arc::clone(&both));
    h.core.set_snapshot(Arc::clone(&both));
    let shared = "127.0.0.50";
    for (i, name) in ["www.allowed.test", "cdn.kept.test"].iter().enumerate() {
        let (socket, fwd) = h.forward(i as u64, &query(0x50 + i as u16, name, TYPE_A));
        let id = u16::from_be_bytes([fwd[0], fwd[1]]);
        let ans = answer(id, name, TYPE_A, &[(name, TYPE_A, 300, &rdata_a(shared))]);
        let out = h.answer(i as u64, socket, &ans);
        assert_eq!(rcode(to_client(&out)), 0);
    }
    // The policy drops *.allowed.test; cdn.kept.test (answered 1 s ago, TTL 300) still
    // justifies the address on 443/TCP.
    h.table.revoke(Arc::clone(&kept_only));
    h.core.set_snapshot(kept_only);
    assert!(
        allowed_443(&h.table, ep(), ip(shared), h.at(2_000)),
        "cdn.kept.test's fresh answer lost its address"
    );
}

/// eBPF mode (review finding E): a query the datapath recorded no origin for is refused even
/// with `--unknown-source allow`, and not judged by its source address either: any workload
/// could have sent it.
#[test]
fn queries_without_an_origin_are_refused_in_ebpf_mode() {
    use dnsfence_engine::core::Origin;
    let mut c = config();
    c.unknown_source = UnknownSource::Allow;
    c.require_origin = true;
    let mut h = Harness::new(c);
    // From the fixture endpoint's own address, with no origin: refused, never forwarded.
    h.core.handle_client(
        h.at(0),
        Client::Udp(CLIENT.parse().unwrap()),
        None,
        &query(0x61, "www.allowed.test", TYPE_A),
    );
    let out = h.drain(0);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(rcode(to_client(&out)), Rcode::Refused as u8);
    assert_eq!(h.core.stats().origin_missing, 1);
    // With an origin naming no endpoint, --unknown-source allow applies (forwarded).
    let origin = Origin {
        endpoint: None,
        server: Some("192.0.2.53:53".parse().unwrap()),
    };
    h.core.handle_client(
        h.at(1),
        Client::Udp("127.0.0.99:5555".parse().unwrap()),
        Some(origin),
        &query(0x62, "anything.test", TYPE_A),
    );
    let out = h.drain(1);
    assert!(
        matches!(out[0].0, Destination::UpstreamUdp { .. }),
        "{out:?}"
    );
}

/// eBPF mode without `--upstream`: each query goes to the server its client addressed when
/// that server is a trusted one (each with its own connected sockets), and only that
/// server's answer is accepted.
mod addressed_servers {
    use super::*;
    use dnsfence_engine::core::Origin;

    const A: &str = "127.0.0.77:53";
    const B: &str = "[fd00::78]:53";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn harness(case: bool) -> Harness {
        let mut c = config();
        c.upstreams = vec![addr(A), addr(B)];
        c.addressed = true;
        c.require_origin = true;
        c.upstream_0x20 = case;
        Harness::new(c)
    }

    /// A query addressed to `server` (None: to the proxy itself), drained.
    fn ask(
        h: &mut Harness,
        ms: u64,
        server: Option<&str>,
        packet: &[u8],
    ) -> Vec<(Destination, Vec<u8>)> {
        let origin = Origin {
            endpoint: Some(ep()),
            server: server.map(addr),
        };
        let client = Client::Udp(CLIENT.parse().unwrap());
        h.core.handle_client(h.at(ms), client, Some(origin), packet);
        h.drain(ms)
    }

    fn forwarded(out: &[(Destination, Vec<u8>)]) -> (u16, Vec<u8>) {
        match out {
            [(Destination::UpstreamUdp { socket }, bytes)] => (*socket, bytes.clone()),
            other => panic!("expected one forward, got {other:?}"),
        }
    }

    fn answer_from(
        h: &mut Harness,
        ms: u64,
        socket: u16,
        from: &str,
        packet: &[u8],
    ) -> Vec<(Destination, Vec<u8>)> {
        h.core.handle_upstream(h.at(ms), socket, addr(from), packet);
        h.drain(ms)
    }

    #[test]
    fn each_query_goes_to_its_servers_own_sockets() {
        let mut h = harness(false);
        for i in 0..32u16 {
            let (server, range) = if i % 2 == 0 { (A, 0..4) } else { (B, 4..8) };
            let out = ask(
                &mut h,
                0,
                Some(server),
                &query(i, &format!("q{i}.allowed.test"), TYPE_A),
            );
            let (socket, fwd) = forwarded(&out);
            assert!(range.contains(&socket), "{server}: socket {socket}");
            // The other server's address on this socket: dropped; its own: answered.
            let other = if server == A { B } else { A };
            assert!(
                answer_from(&mut h, 1, socket, other, &echo_answer(&fwd, "127.0.0.10")).is_empty()
            );
            let out = answer_from(&mut h, 1, socket, server, &echo_answer(&fwd, "127.0.0.10"));
            assert_eq!(rcode(to_client(&out)), 0);
        }
        assert_eq!(h.core.stats().upstream_wrong_source, 32);
        // An IPv4-mapped address is the IPv4 server.
        let out = ask(
            &mut h,
            2,
            Some("[::ffff:127.0.0.77]:53"),
            &query(99, "m.allowed.test", TYPE_A),
        );
        assert!(forwarded(&out).0 < 4);
    }

    /// Review finding: a workload's own DNS server must not get to answer for a toFQDNs name
    /// (its answer would open egress to any address it names).
    #[test]
    fn a_server_the_workload_chose_is_refused_and_never_asked() {
        let mut h = harness(false);
        let out = ask(
            &mut h,
            0,
            Some("198.51.100.66:53"),
            &query(5, "api.allowed.test", TYPE_A),
        );
        assert_eq!(rcode(to_client(&out)), Rcode::Refused as u8);
        let s = h.core.stats();
        assert_eq!((s.untrusted_server, s.forwarded), (1, 0));
    }

    #[test]
    fn a_query_to_the_proxy_itself_has_no_server_and_gets_servfail() {
        let mut h = harness(false);
        let out = ask(&mut h, 0, None, &query(5, "www.allowed.test", TYPE_A));
        assert_eq!(rcode(to_client(&out)), Rcode::ServFail as u8);
        assert_eq!(h.core.stats().no_upstream, 1);
        // A denied name is still refused, whatever the server.
        let out = ask(&mut h, 1, Some(A), &query(6, "evil.example.com", TYPE_A));
        assert_eq!(rcode(to_client(&out)), Rcode::Refused as u8);
        assert_eq!(h.core.stats().forwarded, 0);
    }

    #[test]
    fn tcp_goes_to_the_servers_connection_and_only_its_answer_counts() {
        let mut h = harness(false);
        let client = Client::Tcp {
            conn: 7,
            peer: CLIENT.parse().unwrap(),
        };
        let origin = Origin {
            endpoint: Some(ep()),
            server: Some(addr(B)),
        };
        h.core.handle_client(
            h.at(0),
            client,
            Some(origin),
            &query(9, "t.allowed.test", TYPE_A),
        );
        let out = h.drain(0);
        assert_eq!(out[0].0, Destination::UpstreamTcp { server: 1 });
        let reply = echo_answer(&out[0].1, "127.0.0.13");
        h.core.handle_upstream_tcp(h.at(1), 0, &reply);
        assert!(h.drain(1).is_empty());
        h.core.handle_upstream_tcp(h.at(2), 1, &reply);
        let out = h.drain(2);
        assert_eq!(out[0].0, Destination::Client(client));
        assert_eq!(rcode(&out[0].1), 0);
    }

    #[test]
    fn dns_0x20_falls_back_per_server() {
        let mut h = harness(true);
        // A does not preserve case: 0x20 goes off for A after a few answers.
        for i in 0..dnsfence_engine::core::CASE_FALLBACK_AFTER {
            let name = format!("mixedcase{i}.allowed.test");
            let (socket, fwd) =
                forwarded(&ask(&mut h, 0, Some(A), &query(i as u16, &name, TYPE_A)));
            let mut lower = echo_answer(&fwd, "127.0.0.45");
            lower[12..].make_ascii_lowercase();
            let out = answer_from(&mut h, 0, socket, A, &lower);
            assert_eq!(rcode(to_client(&out)), Rcode::ServFail as u8);
        }
        assert_eq!(h.core.stats().upstream_0x20_disabled, 1);
        let plain = query(20, "lowercase.allowed.test", TYPE_A);
        let (_, fwd) = forwarded(&ask(&mut h, 1, Some(A), &plain));
        assert_eq!(&fwd[12..], &plain[12..], "A: as the client spelled it");
        // B still gets the randomised spelling.
        let name = "averyveryverylongnamewithmanyletters.allowed.test";
        let q = query(21, name, TYPE_A);
        let (_, fwd) = forwarded(&ask(&mut h, 1, Some(B), &q));
        assert_ne!(
            &fwd[12..12 + name.len() + 2],
            &q[12..12 + name.len() + 2],
            "B: case randomised (2^-44 flake)"
        );
    }
}

/// Issue 12 item 2: the query's one walk keeps the toFQDNs rules its answer needs in the
/// pending slot (up to 8; more are found again at answer time). With 3 and with 10 rules
/// selecting the name, each on its own port, the answer opens every one of those ports.
#[test]
fn every_matching_tofqdns_rule_opens_its_port_however_many() {
    for rules in [3u16, 10] {
        let mut policy = POLICY.replace(
            r#"  - toFQDNs: [{matchPattern: "*.allowed.test"}]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
"#,
            "",
        );
        for i in 0..rules {
            policy.push_str(&format!(
                "  - toFQDNs: [{{matchPattern: \"*.allowed.test\"}}]\n    toPorts: [{{ports: [{{port: \"{}\", protocol: TCP}}]}}]\n",
                1000 + i
            ));
        }
        assert_eq!(policy.matches("toFQDNs").count(), usize::from(rules));
        let mut h = Harness::new(config());
        h.core.set_snapshot(Arc::new(snapshot_of(&policy)));
        let (socket, fwd) = h.forward(0, &query(0x77, "www.allowed.test", TYPE_A));
        let id = u16::from_be_bytes([fwd[0], fwd[1]]);
        let ans = answer(
            id,
            "www.allowed.test",
            TYPE_A,
            &[("www.allowed.test", TYPE_A, 300, &rdata_a("127.1.7.7"))],
        );
        let out = h.answer(1, socket, &ans);
        assert_eq!(rcode(to_client(&out)), 0);
        for port in 1000..1000 + rules {
            assert!(
                h.table
                    .is_allowed(ep(), ip("127.1.7.7"), port, PortSpec::TCP, h.at(2)),
                "{rules} rules: port {port} not opened"
            );
        }
        assert!(
            !h.table
                .is_allowed(ep(), ip("127.1.7.7"), 443, PortSpec::TCP, h.at(2))
        );
    }
}

/// DNS rebinding: an allowed name whose answer points at a registered workload's address
/// (here `default/open`, 127.0.0.20) gets no allow entry for it, even when the allow table
/// has no snapshot of its own to judge by (a standalone proxy serving its persisted policy
/// before the agent's first snapshot: review 2); the answer is released, and the answer's
/// other addresses are allowed.
#[test]
fn an_answer_pointing_at_a_workload_opens_nothing_there() {
    let mut h = Harness::new(config());
    let q = query(0x4321, "rebind.allowed.test", TYPE_A);
    let (socket, fwd) = h.forward(0, &q);
    let upstream_id = u16::from_be_bytes([fwd[0], fwd[1]]);
    let ans = answer(
        upstream_id,
        "rebind.allowed.test",
        TYPE_A,
        &[
            ("rebind.allowed.test", TYPE_A, 300, &rdata_a("127.0.0.20")),
            ("rebind.allowed.test", TYPE_A, 300, &rdata_a("127.1.2.4")),
        ],
    );
    h.core.handle_upstream(h.at(5), socket, upstream(), &ans);
    let out = h.drain(5);
    assert_eq!(rcode(to_client(&out)), 0, "the answer is released");
    assert!(!allowed_443(&h.table, ep(), ip("127.0.0.20"), h.at(6)));
    assert!(allowed_443(&h.table, ep(), ip("127.1.2.4"), h.at(6)));
    assert_eq!(h.core.stats().addresses_in_cluster, 1);
}
