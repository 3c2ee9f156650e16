//! The bodies of dnsfence's fuzz targets, as plain functions.
//!
//! The libFuzzer targets in `fuzz_targets/` (built by cargo-fuzz on nightly) call these, and so
//! do the seeded-random tests below, which run on stable with `cargo test`: both exercise the
//! same checks. Every check is an assertion; a failing input panics.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;

use dnsfence_engine::io::tcp::{FrameDecoder, FrameError, MIN_MESSAGE, OutBuf, OutError};
use dnsfence_engine::wire::{self, Addresses};
use dnsfence_matcher::{MatcherBuilder, Name, Pattern, PatternKind, RuleId};
use dnsfence_policy::{Endpoints, PolicySet, Snapshot};
use hickory_proto::op::{Message, MessageType, OpCode};
use hickory_proto::rr::{DNSClass, RData, RecordType};
use regex::Regex;

/// Most patterns one lookup input compiles (more only slows the fuzzer down).
pub const MAX_PATTERNS: usize = 16;

/// `Pattern::parse` (and `parse_name`) on any string must not panic. When a pattern parses:
/// its normalised form reparses to the same pattern, `parse_name` agrees with `parse` on
/// star-free input, and its Cilium regex compiles.
pub fn pattern_parse(input: &str) {
    let as_pattern = Pattern::parse(input);
    let as_name = Pattern::parse_name(input);
    match &as_pattern {
        Ok(p) => {
            let again = Pattern::parse(p.as_str())
                .unwrap_or_else(|e| panic!("normalised {:?} no longer parses: {e}", p.as_str()));
            assert_eq!(
                &again, p,
                "normalised form of {input:?} reparses differently"
            );
            assert_eq!(
                again.as_str(),
                p.as_str(),
                "normalisation is not idempotent"
            );
            assert!(
                p.as_str().ends_with('.'),
                "no trailing dot: {:?}",
                p.as_str()
            );
            assert_eq!(
                p.as_str(),
                p.as_str().to_ascii_lowercase(),
                "not lowercased"
            );
            let re = p.to_anchored_regex();
            Regex::new(&re).unwrap_or_else(|e| panic!("regex {re:?} of {input:?}: {e}"));
        }
        Err(e) => {
            // Errors must render and name the pattern.
            assert!(e.to_string().contains("invalid pattern"), "{e}");
        }
    }
    match (&as_pattern, &as_name) {
        (Ok(p), Ok(n)) => assert_eq!(p, n, "parse and parse_name differ on {input:?}"),
        (Err(_), Ok(n)) => panic!("{input:?} is a valid name {n:?} but not a valid pattern"),
        (Ok(p), Err(_)) => assert!(
            input.contains('*'),
            "{input:?} parses as pattern {p:?} but not as a name"
        ),
        (Err(_), Err(_)) => {}
    }
    if let Ok(p) = Pattern::parse_as(input, PatternKind::Name) {
        assert_eq!(Ok(p), as_name);
    }
}

/// Splits `data` into patterns and a name: lines separated by `\n`, the last line is the name,
/// the ones before it (at most [`MAX_PATTERNS`]) patterns; a pattern line starting with `=` is
/// a `matchName`. Invalid lines are skipped (they must still not panic the parser).
///
/// Returns the verdict for the name read as text, when it is a valid name (for test statistics).
pub fn lookup(data: &[u8]) -> Option<bool> {
    let mut lines: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    let name_bytes = lines.pop().unwrap_or_default();
    let mut patterns = Vec::new();
    for line in lines.into_iter().take(MAX_PATTERNS) {
        let text = String::from_utf8_lossy(line);
        let parsed = match text.strip_prefix('=') {
            Some(name) => Pattern::parse_name(name),
            None => Pattern::parse(&text),
        };
        if let Ok(p) = parsed {
            patterns.push(p);
        }
    }

    let mut builder = MatcherBuilder::new();
    for (i, p) in patterns.iter().enumerate() {
        builder.add(p.clone(), RuleId(i as u32));
    }
    let matcher = builder.build();
    let regexes: Vec<Regex> = patterns
        .iter()
        .map(|p| Regex::new(&p.to_anchored_regex()).expect("reference regex compiles"))
        .collect();

    // The name bytes as wire format: must not panic; when valid, must agree with the reference.
    let _ = matcher.is_match_wire(name_bytes);
    if let Ok(name) = Name::from_wire(name_bytes) {
        check_name(&matcher, &regexes, &name);
    }
    let _ = Name::parse_wire_prefix(name_bytes);

    // The name bytes as text.
    let Ok(text) = std::str::from_utf8(name_bytes) else {
        return None;
    };
    let by_text = matcher.is_match_text(text);
    let Ok(name) = Name::from_text(text) else {
        assert!(!by_text, "invalid name {text:?} matched");
        return None;
    };
    assert_eq!(by_text, matcher.is_match(&name));
    // Text and wire forms of one name are the same name.
    let from_wire = Name::from_wire(name.wire()).expect("a name's own wire form parses");
    assert_eq!(from_wire, name);
    assert_eq!(matcher.is_match_wire(name.wire()), by_text);
    check_name(&matcher, &regexes, &name);
    Some(by_text)
}

/// The trie's verdict and rule ids for a valid `name` must equal the set of patterns whose
/// Cilium regex matches the lowercased name with its trailing dot.
fn check_name(matcher: &dnsfence_matcher::Matcher, regexes: &[Regex], name: &Name) {
    let text = name.to_string();
    let want: Vec<RuleId> = regexes
        .iter()
        .enumerate()
        .filter(|(_, re)| re.is_match(&text))
        .map(|(i, _)| RuleId(i as u32))
        .collect();
    let got = matcher.matches(name);
    assert_eq!(got, want, "rule ids for {text:?}");
    assert_eq!(
        matcher.is_match(name),
        !want.is_empty(),
        "verdict for {text:?}"
    );
    let mut set = matcher.rule_set();
    matcher.lookup_into(name, &mut set);
    let mut ids = set.as_slice().to_vec();
    ids.sort_unstable();
    assert_eq!(ids, want, "lookup_into for {text:?}");
}

// ---------------------------------------------------------------------------------------------
// The engine's wire parsers, TCP framing and the policy loader (issue 11 item 6).

/// Offset of the question name in a DNS message.
const QNAME_AT: usize = wire::HEADER_LEN;

/// The wire length of the uncompressed name at `at`: `None` when it holds a compression
/// pointer (or another label type) or runs past the end.
fn plain_name_len(packet: &[u8], at: usize) -> Option<usize> {
    let mut pos = at;
    loop {
        let len = usize::from(*packet.get(pos)?);
        if len & 0xC0 != 0 {
            return None;
        }
        pos += 1 + len;
        if len == 0 {
            return (pos <= packet.len()).then_some(pos - at);
        }
    }
}

/// A hickory name in uncompressed wire form, spelled as it was received.
fn hickory_wire(name: &hickory_proto::rr::Name) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name.iter() {
        out.push(label.len() as u8);
        out.extend_from_slice(label);
    }
    out.push(0);
    out
}

/// The counts of answer, authority and additional records.
fn record_counts(packet: &[u8]) -> [u16; 3] {
    let at = |i: usize| u16::from_be_bytes([packet[i], packet[i + 1]]);
    [at(6), at(8), at(10)]
}

/// The engine's query parser (`wire::parse_query`) and what the shard does with what it
/// accepts must not panic on any bytes. A query it accepts has a consistent layout, its name
/// is the matcher's `Name::from_wire` (case folded) when that accepts it, and a refusal written
/// in place parses as an answer to it. Cross-checked with hickory-proto: a message hickory
/// reads as one plain query (uncompressed name, a defined class) is accepted here with the same
/// ID, name, type and class; and a bare query (nothing after the question) accepted here is
/// read by hickory the same way.
///
/// Returns whether the engine accepted the query (for test statistics).
pub fn query(packet: &[u8]) -> bool {
    let ours = wire::parse_query(packet);
    let _ = wire::malformed_query_edns(packet);
    let _ = wire::find_opt(packet, QNAME_AT.min(packet.len()));
    if let Ok(q) = &ours {
        let name = q.name_wire(packet);
        assert_eq!(Some(q.id), wire::id(packet));
        assert_eq!(q.question_end, QNAME_AT + name.len() + 4);
        assert!(q.question_end <= packet.len());
        assert_eq!(plain_name_len(packet, QNAME_AT), Some(name.len()));
        if let Ok(n) = Name::from_wire(name) {
            assert!(
                n.wire().eq_ignore_ascii_case(name),
                "matcher name {:?} of {name:?}",
                n.wire()
            );
        }
        let edns = wire::query_edns(packet, q);
        let mut reply = packet.to_vec();
        let len = wire::write_reply(&mut reply, q, wire::Rcode::Refused, true, edns);
        assert!(len <= packet.len(), "reply of {len} bytes to {packet:02x?}");
        let a = wire::parse_answer(&reply[..len])
            .unwrap_or_else(|e| panic!("our refusal {:02x?} does not parse: {e:?}", &reply[..len]));
        assert_eq!((a.id, a.qtype, a.qclass), (q.id, q.qtype, q.qclass));
        assert_eq!(a.name_wire(&reply), name);
        assert_eq!(a.rcode(), wire::Rcode::Refused as u8);
    }

    let theirs = Message::from_vec(packet);
    if let Ok(m) = &theirs {
        let plain = plain_name_len(packet, QNAME_AT).is_some();
        let class = m
            .queries
            .first()
            .map(|q| u16::from(q.query_class))
            .unwrap_or(0);
        if m.metadata.message_type == MessageType::Query
            && m.metadata.op_code == OpCode::Query
            && m.queries.len() == 1
            && plain
            && matches!(class, 1 | 3 | 4 | 254 | 255)
        {
            let q = ours.as_ref().unwrap_or_else(|e| {
                panic!("hickory reads a query ({m:?}) that we reject ({e:?}): {packet:02x?}")
            });
            same_query(packet, q, m);
        }
    }
    if let Ok(q) = &ours
        && record_counts(packet) == [0, 0, 0]
        && q.question_end == packet.len()
    {
        let m = theirs.as_ref().unwrap_or_else(|e| {
            panic!("we accept a bare query that hickory cannot read ({e}): {packet:02x?}")
        });
        same_query(packet, q, m);
    }
    ours.is_ok()
}

/// The engine's view of a query equals hickory's.
fn same_query(packet: &[u8], q: &wire::Query, m: &Message) {
    let theirs = &m.queries[0];
    assert_eq!(q.id, m.metadata.id, "ID of {packet:02x?}");
    assert_eq!(
        q.qtype,
        u16::from(theirs.query_type),
        "type of {packet:02x?}"
    );
    assert_eq!(
        q.qclass,
        u16::from(theirs.query_class),
        "class of {packet:02x?}"
    );
    assert_eq!(
        q.name_wire(packet),
        hickory_wire(&theirs.name).as_slice(),
        "name of {packet:02x?}"
    );
}

/// What `collect_addresses` must find in an answer, computed from hickory's parse.
#[derive(Debug, PartialEq, Eq)]
pub struct ChainView {
    /// The chain's last name's addresses, deduplicated, in answer order.
    pub ips: Vec<IpAddr>,
    /// Minimum TTL over the chain and those addresses (0 without addresses).
    pub min_ttl: u32,
    /// CNAME hops followed.
    pub chain: usize,
    /// Address records not owned by the chain's last name.
    pub off_chain: usize,
}

/// The CNAME-chain rule on hickory's records: from the question name follow the first CNAME
/// (class IN) owned by the current name, at most `MAX_CHAIN` hops (a CNAME to itself or one
/// hop too many ends the walk with no addresses); then keep the A and AAAA records owned by
/// the last name. Only the first 64 IN records of type A, AAAA or CNAME are looked at, as in
/// the engine. Names compare case-insensitively; a TTL with its top bit set counts as 0.
pub fn chain_reference(m: &Message) -> ChainView {
    let ttl = |t: u32| if t > i32::MAX as u32 { 0 } else { t };
    let records: Vec<_> = m
        .answers
        .iter()
        .filter(|r| {
            r.dns_class == DNSClass::IN
                && matches!(
                    r.record_type(),
                    RecordType::A | RecordType::AAAA | RecordType::CNAME
                )
        })
        .take(64)
        .collect();
    let mut on_chain = vec![false; records.len()];
    let mut target = m.queries[0].name.clone();
    let mut view = ChainView {
        ips: Vec::new(),
        min_ttl: u32::MAX,
        chain: 0,
        off_chain: 0,
    };
    let mut chain_ttl = u32::MAX;
    loop {
        let alias = records
            .iter()
            .position(|r| r.record_type() == RecordType::CNAME && r.name == target);
        if let Some(i) = alias {
            let RData::CNAME(alias) = &records[i].data else {
                panic!("CNAME without a name: {:?}", records[i]);
            };
            if view.chain == wire::MAX_CHAIN || alias.0 == target {
                break;
            }
            on_chain[i] = true;
            chain_ttl = chain_ttl.min(ttl(records[i].ttl));
            view.chain += 1;
            target = alias.0.clone();
            continue;
        }
        for (i, r) in records.iter().enumerate() {
            let ip = match &r.data {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(a) => IpAddr::V6(a.0),
                _ => continue,
            };
            if r.name != target {
                continue;
            }
            if !view.ips.contains(&ip) && view.ips.len() < wire::MAX_ADDRESSES {
                view.ips.push(ip);
            }
            view.min_ttl = view.min_ttl.min(ttl(r.ttl));
            on_chain[i] = true;
        }
        break;
    }
    view.off_chain = records
        .iter()
        .zip(on_chain)
        .filter(|(r, on)| !on && matches!(r.record_type(), RecordType::A | RecordType::AAAA))
        .count();
    view.min_ttl = if view.ips.is_empty() {
        0
    } else {
        view.min_ttl.min(chain_ttl)
    };
    view
}

/// The engine's answer parser (`wire::parse_answer` + `collect_addresses`) must not panic on
/// any bytes; what it collects is bounded, without duplicates, and, whenever hickory-proto
/// reads the same message, equal to [`chain_reference`] (addresses, TTL, hops, off-chain
/// count).
///
/// Returns the number of addresses collected, when the answer was accepted.
pub fn answer(packet: &[u8]) -> Option<usize> {
    let a = wire::parse_answer(packet).ok()?;
    assert!(a.question_end <= packet.len());
    assert_eq!(plain_name_len(packet, QNAME_AT), Some(a.name_len));
    let mut out = Addresses::default();
    wire::collect_addresses(packet, &a, &mut out).ok()?;
    let ips = out.ips();
    assert!(ips.len() <= wire::MAX_ADDRESSES);
    assert!(out.chain <= wire::MAX_CHAIN);
    assert_eq!(
        ips.iter().collect::<BTreeSet<_>>().len(),
        ips.len(),
        "duplicates in {ips:?}"
    );
    if ips.is_empty() {
        assert_eq!(out.min_ttl, 0);
    }
    if let Ok(m) = Message::from_vec(packet)
        && m.queries.len() == 1
    {
        let want = chain_reference(&m);
        let got = ChainView {
            ips: ips.to_vec(),
            min_ttl: out.min_ttl,
            chain: out.chain,
            off_chain: out.off_chain,
        };
        assert_eq!(got, want, "answer {packet:02x?} read by hickory as {m:?}");
    }
    Some(ips.len())
}

/// The frames a length-prefixed stream holds, read the simple way: each `u16` length, then
/// the message; a length below [`MIN_MESSAGE`] or above `max` ends the stream with its error.
fn reference_frames(stream: &[u8], max: usize) -> (Vec<&[u8]>, Option<FrameError>) {
    let mut frames = Vec::new();
    let mut pos = 0;
    while pos + 2 <= stream.len() {
        let len = usize::from(u16::from_be_bytes([stream[pos], stream[pos + 1]]));
        if len < MIN_MESSAGE {
            return (frames, Some(FrameError::TooShort(len)));
        }
        if len > max {
            return (frames, Some(FrameError::TooLong(len)));
        }
        let Some(frame) = stream.get(pos + 2..pos + 2 + len) else {
            break;
        };
        frames.push(frame);
        pos += 2 + len;
    }
    (frames, None)
}

/// DNS-over-TCP framing (`io::tcp`, sans-IO). `data[0]` picks the maximum message size,
/// `data[1]` how the stream is cut into reads, the rest is the stream. [`FrameDecoder`] must
/// deliver exactly the frames a plain reading of the stream finds, and its error, whatever the
/// cuts; never hold more than 2 + the maximum; never stall (no room while no frame is ready).
/// The frames then go through an [`OutBuf`] drained in the same cuts: what comes out is each
/// frame it accepted, length-prefixed, in order, and it never holds more than its limit.
pub fn tcp_framing(data: &[u8]) {
    let (Some(&pick), Some(&cuts)) = (data.first(), data.get(1)) else {
        return;
    };
    let stream = &data[2..];
    let max = match pick % 4 {
        0 => 65535,
        1 => MIN_MESSAGE,
        2 => 512,
        _ => MIN_MESSAGE + usize::from(pick),
    };
    // Read sizes from a small LCG: mostly short reads, now and then a large one.
    let mut x = u32::from(cuts) | 1;
    let mut next_cut = move || {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        if (x >> 8) % 8 == 0 {
            5000
        } else {
            1 + (x >> 16) as usize % 97
        }
    };

    let mut decoder = FrameDecoder::new(max);
    let mut got: Vec<Vec<u8>> = Vec::new();
    let mut error = None;
    let mut fed = 0;
    'feed: loop {
        let room = decoder.spare();
        if room.is_empty() {
            // Only allowed while a complete frame (or an error) waits.
            match decoder.next_frame() {
                Ok(Some(frame)) => got.push(frame.to_vec()),
                Ok(None) => panic!("decoder stalled: no room and no frame ({max} max)"),
                Err(e) => {
                    error = Some(e);
                    break 'feed;
                }
            }
            continue;
        }
        let n = next_cut().min(room.len()).min(stream.len() - fed);
        room[..n].copy_from_slice(&stream[fed..fed + n]);
        decoder.commit(n);
        fed += n;
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => got.push(frame.to_vec()),
                Ok(None) => break,
                Err(e) => {
                    error = Some(e);
                    break 'feed;
                }
            }
        }
        assert!(
            decoder.capacity() <= 2 + max,
            "input buffer {} for max {max}",
            decoder.capacity()
        );
        if fed == stream.len() {
            break;
        }
    }
    let (want, want_error) = reference_frames(stream, max);
    assert_eq!(error, want_error, "framing error");
    assert_eq!(got.len(), want.len(), "frames delivered");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.as_slice(), *w);
    }

    let limit = 64 + usize::from(pick) * 16;
    let mut out = OutBuf::new(limit);
    let (mut written, mut expected) = (Vec::new(), Vec::new());
    let drain = |out: &mut OutBuf, written: &mut Vec<u8>, n: usize| {
        let n = n.min(out.pending().len());
        written.extend_from_slice(&out.pending()[..n]);
        out.consume(n);
    };
    for frame in &got {
        match out.push_frame(frame) {
            Ok(()) => {
                expected.extend_from_slice(&(frame.len() as u16).to_be_bytes());
                expected.extend_from_slice(frame);
            }
            Err(OutError::Overflow) => {
                assert!(out.pending().len() + 2 + frame.len() > limit);
            }
            Err(OutError::TooLong) => panic!("a {}-byte frame is too long", frame.len()),
        }
        assert!(out.pending().len() <= limit);
        drain(&mut out, &mut written, next_cut());
    }
    while !out.is_empty() {
        drain(&mut out, &mut written, next_cut());
    }
    assert_eq!(written, expected, "OutBuf output");
}

/// The policy loader (`PolicySet::from_yaml`, `Endpoints::from_yaml`) on any text must not
/// panic; a rejection lists at least one error, each `FILE:LINE: reason` with a line within
/// the text, and the same on a second parse; what loads compiles into a snapshot (with its own
/// endpoints when the text is both).
///
/// Returns whether the text loaded as a policy (for test statistics).
pub fn policy_yaml(text: &str) -> bool {
    let file = Path::new("fuzz.yaml");
    let policies = PolicySet::from_yaml(file, text);
    let endpoints = Endpoints::from_yaml(file, text);
    // Lines as YAML counts them: a CR alone breaks a line too (found by libFuzzer: "\r\r!"
    // has its error on line 3, where `str::lines` sees one line); plus one for an error at
    // the end of the text.
    let breaks =
        text.matches('\n').count() + text.matches('\r').count() - text.matches("\r\n").count();
    let lines = breaks + 2;
    for errors in [policies.as_ref().err(), endpoints.as_ref().err()]
        .into_iter()
        .flatten()
    {
        assert!(!errors.is_empty(), "a rejection without errors");
        for e in errors.errors() {
            assert!(e.line <= lines, "{e} is past the {lines} lines of {text:?}");
            assert!(e.to_string().starts_with("fuzz.yaml:"), "{e}");
        }
    }
    assert_eq!(
        PolicySet::from_yaml(file, text).err(),
        policies.as_ref().err().cloned(),
        "two parses of {text:?} differ"
    );
    if let Ok(p) = &policies {
        let _ = p.summary();
        let _ = Snapshot::compile(p, &Endpoints::default());
        if let Ok(e) = &endpoints {
            let snapshot = Snapshot::compile(p, e);
            let _ = snapshot.endpoints().count();
        }
    }
    policies.is_ok()
}

#[cfg(test)]
mod tests {
    //! Seeded-random inputs for the targets, so `cargo test` exercises them on stable. The
    //! alphabets are small so that random patterns and names often meet.

    use super::*;

    const CASES: usize = 5000;

    fn random_text(rng: &mut fastrand::Rng, alphabet: &[&str], max_len: usize) -> String {
        let len = rng.usize(0..=max_len);
        (0..len)
            .map(|_| alphabet[rng.usize(..alphabet.len())])
            .collect()
    }

    #[test]
    fn pattern_parse_random() {
        let mut rng = fastrand::Rng::with_seed(0x5eed_0001);
        let alphabet = [
            "a", "b", "Z", "0", "-", "_", ".", ".", "*", "*", "**.", " ", "\t", "/", "é", "\u{0}",
        ];
        for _ in 0..CASES {
            let s = random_text(&mut rng, &alphabet, 24);
            pattern_parse(&s);
        }
        // Long inputs around the 255-character limit.
        for _ in 0..200 {
            let s = random_text(&mut rng, &["a", "b.", "*", "ab"], 200);
            pattern_parse(&s);
        }
        for s in [
            "", ".", "*", "**", "**.", "*.", "a..b", "**.a", " A.b. ", "a*", "=a",
        ] {
            pattern_parse(s);
        }
        // libFuzzer (coverage-guided): 255 characters without a trailing dot, whose
        // normalised form (256 with the dot) was refused as too long.
        pattern_parse(&"y".repeat(255));
        pattern_parse(&format!("*{}*.", "y".repeat(252)));
    }

    fn random_label(rng: &mut fastrand::Rng, alphabet: &[&str]) -> String {
        let mut label = random_text(rng, alphabet, 4);
        if label.is_empty() {
            label.push('a');
        }
        label
    }

    fn random_input(rng: &mut fastrand::Rng) -> Vec<u8> {
        let pattern_alphabet = ["a", "b", "A", "-", "*", "*", "**"];
        let name_alphabet = ["a", "b", "B", "-", "ab", "ba"];
        let mut input = Vec::new();
        for _ in 0..rng.usize(0..=6) {
            if rng.u32(0..8) == 0 {
                input.push(b'=');
            }
            let mut labels: Vec<String> = (0..rng.usize(1..=4))
                .map(|_| random_label(rng, &pattern_alphabet))
                .collect();
            if rng.u32(0..4) == 0 {
                labels.insert(0, "**".into());
            }
            let tail = if rng.bool() { "." } else { "" };
            input.extend_from_slice(format!("{}{tail}", labels.join(".")).as_bytes());
            input.push(b'\n');
        }
        match rng.u32(0..10) {
            // Sometimes random bytes, sometimes a wire-format name, mostly a text name.
            0 => input.extend((0..rng.usize(0..12)).map(|_| rng.u8(..))),
            1 => {
                for _ in 0..rng.usize(0..=4) {
                    let label = random_label(rng, &name_alphabet);
                    input.push(label.len() as u8);
                    input.extend_from_slice(label.as_bytes());
                }
                input.push(0);
            }
            _ => {
                let labels: Vec<String> = (0..rng.usize(0..=5))
                    .map(|_| random_label(rng, &name_alphabet))
                    .collect();
                input.extend_from_slice(labels.join(".").as_bytes());
            }
        }
        input
    }

    #[test]
    fn lookup_random() {
        let mut rng = fastrand::Rng::with_seed(0x5eed_0002);
        let (mut hits, mut misses) = (0, 0);
        for _ in 0..CASES {
            let input = random_input(&mut rng);
            match lookup(&input) {
                Some(true) => hits += 1,
                Some(false) => misses += 1,
                None => {}
            }
        }
        // The alphabets are small enough that both verdicts are common.
        assert!(
            hits > CASES / 10 && misses > CASES / 10,
            "{hits} hits, {misses} misses"
        );
    }

    #[test]
    fn lookup_known_cases() {
        let cases: &[&[u8]] = &[
            b"",
            b"\n",
            b"*.cilium.io\nsub.cilium.io",
            b"*.cilium.io\ncilium.io",
            b"**.cilium.io\na.b.CILIUM.io.",
            b"part*ial.com\npart-extra-ial.com",
            b"*\n",
            b"**.\n.",
            b"=a.b\n\x01a\x01b\x00",
            b"*.b\n\x01a\x01b\x00",
            b"a\n\xc0\x0c",
        ];
        for case in cases {
            let _ = lookup(case);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Wire, framing and policy inputs: valid messages built from small alphabets, then some
    // of them mutated, so that both accepted and rejected inputs are common.

    /// Wire form of a dotted name (no compression).
    fn wire_name(name: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for label in name.split('.').filter(|l| !l.is_empty()) {
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
        out.push(0);
        out
    }

    /// A short name from a tiny alphabet, in random case.
    fn small_name(rng: &mut fastrand::Rng) -> String {
        let names = ["a.t", "b.t", "c.t", "d.t", "x.a.t", "t"];
        let name = names[rng.usize(..names.len())];
        name.chars()
            .map(|c| {
                if rng.bool() {
                    c.to_ascii_uppercase()
                } else {
                    c
                }
            })
            .collect()
    }

    /// Flips, inserts or removes a few bytes, or cuts the message short.
    fn mutate(rng: &mut fastrand::Rng, p: &mut Vec<u8>) {
        for _ in 0..rng.usize(1..=3) {
            match rng.u32(0..4) {
                0 if !p.is_empty() => {
                    let at = rng.usize(..p.len());
                    p[at] = rng.u8(..);
                }
                1 => {
                    let at = rng.usize(..=p.len());
                    p.insert(at, rng.u8(..));
                }
                2 if !p.is_empty() => {
                    p.remove(rng.usize(..p.len()));
                }
                _ => p.truncate(rng.usize(..=p.len())),
            }
        }
    }

    fn random_query(rng: &mut fastrand::Rng) -> Vec<u8> {
        let mut p = rng.u16(..).to_be_bytes().to_vec();
        let flags: u16 = [0x0100, 0x0000, 0x0120, 0x8100, 0x2800][rng.usize(..5)];
        p.extend_from_slice(&flags.to_be_bytes());
        p.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
        let name = if rng.u32(0..8) == 0 {
            "Ex_Am-ple.\u{7f}x".to_owned()
        } else {
            small_name(rng)
        };
        p.extend_from_slice(&wire_name(&name));
        let qtype: u16 = [1, 28, 5, 255, 65, 0xffff][rng.usize(..6)];
        let qclass: u16 = [1, 1, 1, 3, 255, 2][rng.usize(..6)];
        p.extend_from_slice(&qtype.to_be_bytes());
        p.extend_from_slice(&qclass.to_be_bytes());
        if rng.u32(0..3) == 0 {
            // An EDNS0 OPT record, sometimes with a cookie option.
            p[11] = 1;
            p.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0x80, 0]);
            if rng.bool() {
                p.extend_from_slice(&[12, 0, 10, 0, 8]);
                p.extend((0..8).map(|_| rng.u8(..)));
            } else {
                p.extend_from_slice(&[0, 0]);
            }
        }
        if rng.u32(0..3) == 0 {
            mutate(rng, &mut p);
        }
        p
    }

    #[test]
    fn query_random() {
        let mut rng = fastrand::Rng::with_seed(0x5eed_0003);
        let mut accepted = 0;
        for _ in 0..CASES {
            let p = random_query(&mut rng);
            accepted += usize::from(query(&p));
        }
        for _ in 0..CASES / 5 {
            let p: Vec<u8> = (0..rng.usize(0..40)).map(|_| rng.u8(..)).collect();
            query(&p);
        }
        assert!(
            accepted > CASES / 4 && accepted < CASES * 9 / 10,
            "{accepted} of {CASES} accepted"
        );
        for p in [
            &b""[..],
            b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x01",
            b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01",
            b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01A\x00\x00\x01\x00\x02",
        ] {
            query(p);
        }
    }

    /// One record: owner (the question via a pointer when it is the question name), type,
    /// class IN, TTL, data.
    fn push_record(p: &mut Vec<u8>, owner: &[u8], rtype: u16, ttl: u32, rdata: &[u8]) {
        p.extend_from_slice(owner);
        p.extend_from_slice(&rtype.to_be_bytes());
        p.extend_from_slice(&1u16.to_be_bytes());
        p.extend_from_slice(&ttl.to_be_bytes());
        p.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        p.extend_from_slice(rdata);
    }

    /// An answer whose records are CNAMEs and addresses among a handful of names (chains,
    /// loops, off-chain addresses), sometimes mutated.
    fn random_answer(rng: &mut fastrand::Rng) -> Vec<u8> {
        let qname = small_name(rng);
        let mut p = rng.u16(..).to_be_bytes().to_vec();
        p.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0]);
        p.extend_from_slice(&wire_name(&qname));
        p.extend_from_slice(&[0, 1, 0, 1]);
        let records = rng.usize(0..8);
        for _ in 0..records {
            let owner = small_name(rng);
            let owner = if rng.bool() && owner.eq_ignore_ascii_case(&qname) {
                vec![0xc0, 0x0c]
            } else {
                wire_name(&owner)
            };
            let ttl = [0, 30, 300, 0x8000_0000][rng.usize(..4)];
            match rng.u32(0..5) {
                0 | 1 => push_record(&mut p, &owner, 5, ttl, &wire_name(&small_name(rng))),
                2 | 3 => push_record(&mut p, &owner, 1, ttl, &[192, 0, 2, rng.u8(0..4)]),
                _ => {
                    let mut v6 = [0u8; 16];
                    v6[0] = 0x20;
                    v6[15] = rng.u8(0..4);
                    push_record(&mut p, &owner, 28, ttl, &v6);
                }
            }
        }
        p[7] = records as u8;
        if rng.u32(0..4) == 0 {
            mutate(rng, &mut p);
        }
        p
    }

    #[test]
    fn answer_random() {
        let mut rng = fastrand::Rng::with_seed(0x5eed_0004);
        let (mut with_addresses, mut without) = (0, 0);
        for _ in 0..CASES {
            match answer(&random_answer(&mut rng)) {
                Some(0) => without += 1,
                Some(_) => with_addresses += 1,
                None => {}
            }
        }
        assert!(
            with_addresses > CASES / 10 && without > CASES / 10,
            "{with_addresses} answers with addresses, {without} without"
        );
        for _ in 0..CASES / 5 {
            let p: Vec<u8> = (0..rng.usize(0..60)).map(|_| rng.u8(..)).collect();
            answer(&p);
        }
    }

    #[test]
    fn tcp_framing_random() {
        let mut rng = fastrand::Rng::with_seed(0x5eed_0005);
        for _ in 0..CASES / 5 {
            let mut data = vec![rng.u8(..), rng.u8(..)];
            // Mostly well-framed messages of plausible sizes, sometimes a bad length.
            for _ in 0..rng.usize(0..6) {
                let len = match rng.u32(0..8) {
                    0 => rng.usize(0..12),
                    1 => rng.usize(400..5000),
                    _ => rng.usize(12..120),
                };
                data.extend_from_slice(&(len as u16).to_be_bytes());
                data.extend((0..len).map(|_| rng.u8(..)));
            }
            if rng.u32(0..4) == 0 {
                mutate(&mut rng, &mut data);
            }
            tcp_framing(&data);
        }
        tcp_framing(&[0, 0, 0xff, 0xff]);
        tcp_framing(&[1, 0, 0, 12]);
    }

    use dnsfence_testkit::fixtures::{ENDPOINTS, POLICY};

    #[test]
    fn policy_yaml_random() {
        assert!(policy_yaml(POLICY), "the base policy loads");
        let mut rng = fastrand::Rng::with_seed(0x5eed_0006);
        let tokens = [
            "{",
            "}",
            "[",
            "]",
            ": ",
            "- ",
            " ",
            "\n",
            "\"",
            "'",
            "*",
            "&a ",
            "*a",
            "!!str ",
            "# ",
            "port",
            "53",
            "matchPattern",
            "toFQDNs",
            "~",
            "null",
            "**.",
            "\t",
            "---\n",
            "é",
        ];
        let mut loaded = 0;
        for _ in 0..CASES / 5 {
            let base = if rng.u32(0..4) == 0 {
                ENDPOINTS
            } else {
                POLICY
            };
            let mut text = base.to_owned();
            for _ in 0..rng.usize(1..=3) {
                let mut at = rng.usize(..=text.len());
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                match rng.u32(0..4) {
                    0 => text.truncate(at),
                    1 => {
                        // Drop the line at `at`.
                        let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
                        let end = text[at..].find('\n').map_or(text.len(), |i| at + i + 1);
                        text.replace_range(start..end, "");
                    }
                    _ => text.insert_str(at, tokens[rng.usize(..tokens.len())]),
                }
            }
            loaded += usize::from(policy_yaml(&text));
        }
        // Most mutations break a policy (a few percent still load): both outcomes occur.
        assert!(
            loaded > CASES / 5 / 50 && loaded < CASES / 5 * 9 / 10,
            "{loaded} of {} mutated texts loaded",
            CASES / 5
        );
        for text in [
            "",
            "---",
            "\0",
            "endpoints: []",
            "{",
            "a: *b",
            "[[[[[[[[[[[[[[",
            // libFuzzer (coverage-guided, fuzz/artifacts): bare CR line breaks.
            "\r\r!",
        ] {
            policy_yaml(text);
        }
        policy_yaml(&format!("{POLICY}---\n{POLICY}"));
        policy_yaml(&format!("{POLICY}---\n{ENDPOINTS}"));
    }
}
