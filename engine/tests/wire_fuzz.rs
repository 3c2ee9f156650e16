//! Untrusted bytes never panic the wire parsers, and answers they accept obey the chain rule:
//! random packets, valid answers with random bytes flipped, and random CNAME chains with
//! off-chain addresses mixed in, whose exact outcome is known by construction.

mod common;

use common::*;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use dnsfence_engine::wire::{self, Addresses, CLASS_IN, TYPE_A, TYPE_AAAA, TYPE_CNAME};
use proptest::prelude::*;

fn valid_answer() -> Vec<u8> {
    answer(
        0x1234,
        "www.allowed.test",
        TYPE_A,
        &[
            (
                "www.allowed.test",
                TYPE_CNAME,
                300,
                &rdata_name("edge.cdn.test"),
            ),
            ("edge.cdn.test", TYPE_A, 60, &rdata_a("127.0.0.1")),
            ("other.test", TYPE_A, 60, &rdata_a("127.0.0.2")),
        ],
    )
}

/// One answer record of a generated chain answer.
#[derive(Debug, Clone)]
struct Rec {
    owner: String,
    rtype: u16,
    ttl: u32,
    rdata: Vec<u8>,
}

/// The question name, the chain's hops, and names that are on no chain.
const QNAME: &str = "www.q.test";
fn hop(i: usize) -> String {
    format!("hop{i}.cdn.test")
}
const STRANGERS: [&str; 3] = ["other.test", "x.hop0.cdn.test", "q.test"];

/// An address record: A or AAAA, told apart by the address.
fn address(ip: IpAddr, owner: String, ttl: u32) -> Rec {
    let (rtype, rdata) = match ip {
        IpAddr::V4(v4) => (TYPE_A, v4.octets().to_vec()),
        IpAddr::V6(v6) => (TYPE_AAAA, v6.octets().to_vec()),
    };
    Rec {
        owner,
        rtype,
        ttl,
        rdata,
    }
}

fn ip_strategy() -> impl Strategy<Value = IpAddr> {
    // Few distinct values, so duplicates occur.
    prop_oneof![
        (0u8..6).prop_map(|b| IpAddr::V4(Ipv4Addr::new(192, 0, 2, b))),
        (0u16..3).prop_map(|b| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, b))),
    ]
}

/// What `collect_addresses` must return for a generated chain answer.
#[derive(Debug, PartialEq)]
struct Expected {
    ips: Vec<IpAddr>,
    min_ttl: u32,
    chain: usize,
    off_chain: usize,
}

/// A chain answer: the question `QNAME` aliased through `hops` CNAMEs to its last name, which
/// owns `last` addresses; `off` address records owned by names before the chain's end (a name
/// with a CNAME has no other data) or by names on no chain; the records shuffled. Returns the
/// records and the outcome the CNAME-chain rule gives: exactly the last name's addresses (in
/// answer order, without duplicates), with the minimum TTL over the chain and them, and every
/// other address record counted off-chain.
fn chain_answer() -> impl Strategy<Value = (Vec<Rec>, Expected)> {
    (0usize..=wire::MAX_CHAIN)
        .prop_flat_map(|hops| {
            (
                prop::collection::vec(0u32..100_000, hops),
                prop::collection::vec((ip_strategy(), 0u32..100_000), 0..6),
                prop::collection::vec((ip_strategy(), 0u32..100_000, 0usize..32), 0..6),
            )
        })
        .prop_flat_map(|(cname_ttls, last, off)| {
            let hops = cname_ttls.len();
            let chain_name = |i: usize| if i == 0 { QNAME.to_owned() } else { hop(i) };
            let mut recs: Vec<Rec> = cname_ttls
                .iter()
                .enumerate()
                .map(|(i, &ttl)| Rec {
                    owner: chain_name(i),
                    rtype: TYPE_CNAME,
                    ttl,
                    rdata: name_wire(&chain_name(i + 1)),
                })
                .collect();
            recs.extend(
                last.iter()
                    .map(|&(ip, ttl)| address(ip, chain_name(hops), ttl)),
            );
            // Off-chain owners: a name of the chain before its end, or a stranger.
            let off_owners = hops + STRANGERS.len();
            recs.extend(off.iter().map(|&(ip, ttl, pick)| {
                let pick = pick % off_owners;
                let owner = if pick < hops {
                    chain_name(pick)
                } else {
                    STRANGERS[pick - hops].to_owned()
                };
                address(ip, owner, ttl)
            }));
            let off_chain = off.len();
            (
                Just(recs).prop_shuffle(),
                Just((hops, cname_ttls, off_chain)),
            )
        })
        .prop_map(|(recs, (hops, cname_ttls, off_chain))| {
            let last = if hops == 0 {
                QNAME.to_owned()
            } else {
                hop(hops)
            };
            let mut ips = Vec::new();
            let mut min_ttl = cname_ttls.iter().copied().min().unwrap_or(u32::MAX);
            let mut any = false;
            for r in &recs {
                if r.rtype != TYPE_CNAME && r.owner == last {
                    any = true;
                    min_ttl = min_ttl.min(r.ttl);
                    let ip = match r.rdata.len() {
                        4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(&r.rdata[..]).unwrap())),
                        _ => {
                            IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&r.rdata[..]).unwrap()))
                        }
                    };
                    if !ips.contains(&ip) {
                        ips.push(ip);
                    }
                }
            }
            let expected = Expected {
                ips,
                min_ttl: if any { min_ttl } else { 0 },
                chain: hops,
                off_chain,
            };
            (recs, expected)
        })
}

/// The answer message of `recs`: owners in the spelling `case` picks (bit per record), the
/// question's name as a compression pointer when `case`'s high bit for it says so.
fn chain_packet(recs: &[Rec], case: u64) -> Vec<u8> {
    let mut p = vec![0x12, 0x34, 0x81, 0x80, 0, 1];
    p.extend_from_slice(&(recs.len() as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0]);
    p.extend_from_slice(&name_wire(QNAME));
    p.extend_from_slice(&TYPE_A.to_be_bytes());
    p.extend_from_slice(&CLASS_IN.to_be_bytes());
    for (i, r) in recs.iter().enumerate() {
        let bit = |k: u32| case.rotate_left(i as u32 * 2 + k) & 1 == 1;
        if r.owner == QNAME && bit(1) {
            p.extend_from_slice(&[0xc0, 0x0c]);
        } else if bit(0) {
            p.extend_from_slice(&name_wire(&r.owner.to_ascii_uppercase()));
        } else {
            p.extend_from_slice(&name_wire(&r.owner));
        }
        p.extend_from_slice(&r.rtype.to_be_bytes());
        p.extend_from_slice(&CLASS_IN.to_be_bytes());
        p.extend_from_slice(&r.ttl.to_be_bytes());
        p.extend_from_slice(&(r.rdata.len() as u16).to_be_bytes());
        p.extend_from_slice(&r.rdata);
    }
    p
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    /// The chain rule the parser claims: exactly the A/AAAA of the chain's last name, the
    /// chain's minimum TTL, its hop count, and every other address record counted off-chain,
    /// whatever the record order, owner case or compression.
    #[test]
    fn chains_yield_exactly_the_last_names_addresses(
        (recs, want) in chain_answer(),
        case in any::<u64>(),
    ) {
        let p = chain_packet(&recs, case);
        let a = wire::parse_answer(&p).expect("a generated answer parses");
        let mut out = Addresses::default();
        wire::collect_addresses(&p, &a, &mut out).expect("a generated answer's records parse");
        let got = Expected {
            ips: out.ips().to_vec(),
            min_ttl: out.min_ttl,
            chain: out.chain,
            off_chain: out.off_chain,
        };
        prop_assert_eq!(got, want, "records {:?}", recs);
        prop_assert_eq!(out.overflow, 0);
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = wire::parse_query(&bytes);
        let _ = wire::find_opt(&bytes, 12.min(bytes.len()));
        let _ = wire::malformed_query_edns(&bytes);
        if let Ok(a) = wire::parse_answer(&bytes) {
            let mut out = Addresses::default();
            let _ = wire::collect_addresses(&bytes, &a, &mut out);
        }
        if let Ok(q) = wire::parse_query(&bytes) {
            let mut buf = bytes.clone();
            let edns = wire::query_edns(&bytes, &q);
            let len = wire::write_reply(&mut buf, &q, wire::Rcode::Refused, true, edns);
            prop_assert!(len <= bytes.len());
            prop_assert!(wire::parse_answer(&buf[..len]).is_ok());
        }
    }

    #[test]
    fn mutated_answers_never_panic(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut p = valid_answer();
        for (at, byte) in flips {
            let i = at.index(p.len());
            p[i] = byte;
        }
        if truncate {
            p.truncate(cut.index(p.len() + 1));
        }
        if let Ok(a) = wire::parse_answer(&p) {
            let mut out = Addresses::default();
            if wire::collect_addresses(&p, &a, &mut out).is_ok() {
                prop_assert!(out.ips().len() <= wire::MAX_ADDRESSES);
                prop_assert!(out.chain <= wire::MAX_CHAIN);
            }
        }
    }
}

#[test]
fn the_unmutated_answer_yields_only_the_chain_address() {
    let p = valid_answer();
    let a = wire::parse_answer(&p).unwrap();
    let mut out = Addresses::default();
    wire::collect_addresses(&p, &a, &mut out).unwrap();
    assert_eq!(
        out.ips(),
        &["127.0.0.1".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(out.off_chain, 1);
    assert_eq!(out.min_ttl, 60);
}
