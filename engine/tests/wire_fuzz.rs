//! Untrusted bytes never panic the wire parsers, and answers they accept obey the chain rule:
//! random packets, and valid answers with random bytes flipped.

mod common;

use common::*;
use dnsfence_engine::wire::{self, Addresses, TYPE_A, TYPE_CNAME};
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

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
