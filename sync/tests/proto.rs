//! The agent <-> proxy protocol: round trips, partial reads, limits, bad input.

use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr};

use dnsfence_sync::proto::{
    DEFAULT_MAX_FRAME, DecodeError, Decoder, EncodeError, Encoder, FEATURE_DENY_ANSWERS,
    FlowRecord, Flows, FlowsAck, HEADER_LEN, Hello, MAGIC, Message, MessageType, NodeFacts,
    Observation, Observations, ObservationsAck, PROTOCOL_VERSION, PolicySnapshot, Role,
    SnapshotAck, SourceFile, process_instance,
};
use proptest::prelude::*;

fn observation(i: u64) -> Observation {
    Observation {
        endpoint_key: u64::MAX - i,
        name: format!("host{i}.example.com"),
        addresses: vec![
            IpAddr::from([192, 0, 2, i as u8]),
            "2001:db8::1".parse().unwrap(),
        ],
        ttl_secs: 300,
        observed_unix_ms: 1_764_554_400_000 + i,
    }
}

fn flow(i: u64, endpoint_key: Option<u64>) -> FlowRecord {
    FlowRecord {
        unix_ms: 1_764_554_400_000 + i,
        client: SocketAddr::from(([10, 0, 1, 5], 40_000 + i as u16)),
        endpoint_key,
        name: "ünïcode-and-\"quotes\"\n.example".into(),
        qtype: 28,
        verdict: "FORWARDED".into(),
        rcode: 0,
        dropped: i % 2 == 1,
        addresses: vec!["fd00::5".parse().unwrap()],
        ttl: 60,
        latency_us: 1234,
        served_by: "proxy".into(),
    }
}

/// A flow record from a proxy that predates `dropped` decodes (as answered).
#[test]
fn a_flow_record_without_dropped_decodes() {
    let mut v = serde_json::to_value(flow(1, Some(7))).unwrap();
    assert_eq!(v["dropped"], true);
    v.as_object_mut().unwrap().remove("dropped");
    let back: FlowRecord = serde_json::from_value(v).unwrap();
    assert!(!back.dropped);
    assert_eq!(back.name, flow(1, Some(7)).name);
}

/// One message of every type (two Flows: with and without an endpoint).
fn every_message() -> Vec<Message> {
    vec![
        Message::Hello(Hello::new(Role::Agent)),
        Message::Hello(Hello {
            role: Role::Observer,
            protocol_version: PROTOCOL_VERSION,
            pid: u32::MAX,
            instance: u64::MAX,
            features: Vec::new(),
        }),
        Message::PolicySnapshot(PolicySnapshot {
            version: 7,
            policy_files: vec![
                SourceFile {
                    path: "/etc/dnsfence/policy/a.yaml".into(),
                    content: "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n".into(),
                },
                SourceFile {
                    path: "b.yaml".into(),
                    content: String::new(),
                },
            ],
            endpoints: SourceFile {
                path: "endpoints.yaml".into(),
                content: "endpoints: []\n".into(),
            },
            node: NodeFacts {
                cluster_cidrs: vec!["10.0.0.0/8".into()],
                node_ips: vec!["192.0.2.1".into()],
                kube_apiserver: vec![],
                open_loopback_answers: true,
                deny_answer_cidrs: vec!["203.0.113.0/24".into()],
            },
            policy_id: u64::MAX - 3,
        }),
        Message::SnapshotAck(SnapshotAck { version: 7 }),
        Message::Observations(Observations {
            seq: 1,
            items: (0..3).map(observation).collect(),
        }),
        Message::ObservationsAck(ObservationsAck { seq: 1 }),
        Message::Flows(Flows {
            seq: u64::from(u32::MAX) + 1,
            items: vec![flow(0, Some(0)), flow(1, None)],
        }),
        Message::FlowsAck(FlowsAck { seq: 3 }),
        Message::Heartbeat,
    ]
}

fn encode_all(msgs: &[Message]) -> Vec<u8> {
    let enc = Encoder::new();
    let mut out = Vec::new();
    for m in msgs {
        enc.encode(m, &mut out).unwrap();
    }
    out
}

fn decode_all(dec: &mut Decoder) -> Vec<Message> {
    let mut got = Vec::new();
    while let Some(m) = dec.decode().unwrap() {
        got.push(m);
    }
    got
}

fn header(version: u16, ty: u16, len: u32) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend_from_slice(&version.to_be_bytes());
    h.extend_from_slice(&ty.to_be_bytes());
    h.extend_from_slice(&len.to_be_bytes());
    h
}

#[test]
fn every_message_round_trips() {
    let msgs = every_message();
    let covered: std::collections::HashSet<_> = msgs.iter().map(|m| m.message_type()).collect();
    assert_eq!(
        covered.len(),
        MessageType::ALL.len(),
        "a message type is not covered"
    );
    for m in &msgs {
        let bytes = encode_all(std::slice::from_ref(m));
        // The header says what the message is and how long its body is.
        assert_eq!(bytes[..4], MAGIC);
        assert_eq!(u16::from_be_bytes([bytes[4], bytes[5]]), PROTOCOL_VERSION);
        assert_eq!(
            u16::from_be_bytes([bytes[6], bytes[7]]),
            m.message_type() as u16
        );
        let len = u32::from_be_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
        assert_eq!(len, bytes.len() - HEADER_LEN);
        let mut dec = Decoder::new();
        dec.feed(&bytes);
        assert_eq!(dec.decode().unwrap().as_ref(), Some(m));
        assert_eq!(dec.decode().unwrap(), None);
        assert_eq!(dec.buffered(), 0);
    }
}

#[test]
fn the_body_is_json_with_hex_keys() {
    let bytes = encode_all(&[Message::Flows(Flows {
        seq: 5,
        items: vec![flow(0, Some(0x0123_4567_89ab_cdef))],
    })]);
    let body: serde_json::Value = serde_json::from_slice(&bytes[HEADER_LEN..]).unwrap();
    assert_eq!(body["seq"], 5);
    assert_eq!(body["items"][0]["endpoint_key"], "0123456789abcdef");
    assert_eq!(body["items"][0]["client"], "10.0.1.5:40000");
    assert_eq!(body["items"][0]["addresses"][0], "fd00::5");
    // Without features, a Hello is what older builds send and read.
    let old = br#"{"role":"proxy","protocol_version":1,"pid":9,"instance":"0000000000000001"}"#;
    let mut hello = Hello {
        role: Role::Proxy,
        protocol_version: 1,
        pid: 9,
        instance: 1,
        features: Vec::new(),
    };
    let bytes = encode_all(&[Message::Hello(hello.clone())]);
    assert_eq!(&bytes[HEADER_LEN..], old);
    assert_eq!(serde_json::from_slice::<Hello>(old).unwrap(), hello);
    assert!(!hello.has(FEATURE_DENY_ANSWERS));
    hello.features = vec![FEATURE_DENY_ANSWERS.into()];
    let bytes = encode_all(&[Message::Hello(hello.clone())]);
    assert_eq!(
        &bytes[HEADER_LEN..],
        br#"{"role":"proxy","protocol_version":1,"pid":9,"instance":"0000000000000001","features":["deny-answer-cidrs"]}"#
    );
    assert!(Hello::new(Role::Proxy).has(FEATURE_DENY_ANSWERS));
    assert_eq!(&encode_all(&[Message::Heartbeat])[HEADER_LEN..], b"{}");
}

#[test]
fn borrowed_batches_encode_like_owned_ones() {
    let enc = Encoder::new();
    let obs: Vec<_> = (0..4).map(observation).collect();
    let mut a = Vec::new();
    enc.encode_observations(9, &obs, &mut a).unwrap();
    let owned = encode_all(&[Message::Observations(Observations { seq: 9, items: obs })]);
    assert_eq!(a, owned);
    let flows = vec![flow(1, None)];
    let mut b = Vec::new();
    enc.encode_flows(2, &flows, &mut b).unwrap();
    assert_eq!(
        b,
        encode_all(&[Message::Flows(Flows {
            seq: 2,
            items: flows
        })])
    );
}

#[test]
fn split_at_every_byte_boundary() {
    let msgs = every_message();
    let bytes = encode_all(&msgs);
    for cut in 0..=bytes.len() {
        let mut dec = Decoder::new();
        dec.feed(&bytes[..cut]);
        let mut got = decode_all(&mut dec);
        dec.feed(&bytes[cut..]);
        got.extend(decode_all(&mut dec));
        assert_eq!(got, msgs, "cut at {cut}");
        assert_eq!(dec.buffered(), 0);
    }
}

#[test]
fn one_byte_at_a_time() {
    let msgs = every_message();
    let bytes = encode_all(&msgs);
    let mut dec = Decoder::new();
    let mut got = Vec::new();
    for b in &bytes {
        dec.feed(std::slice::from_ref(b));
        got.extend(decode_all(&mut dec));
    }
    assert_eq!(got, msgs);
}

/// A reader that hands out at most `chunk` bytes per read, and WouldBlock between reads.
struct Trickle {
    data: Vec<u8>,
    pos: usize,
    chunk: usize,
    block_next: bool,
}

impl Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.block_next = !self.block_next;
        if !self.block_next {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = self.chunk.min(buf.len()).min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[test]
fn read_from_a_nonblocking_reader() {
    let msgs = every_message();
    for chunk in [1, 5, 13, 100_000] {
        let mut r = Trickle {
            data: encode_all(&msgs),
            pos: 0,
            chunk,
            block_next: true,
        };
        let mut dec = Decoder::new();
        let mut got = Vec::new();
        loop {
            match dec.read_from(&mut r) {
                Ok(0) => break,
                Ok(_) => got.extend(decode_all(&mut dec)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, msgs, "chunk {chunk}");
        assert_eq!(dec.buffered(), 0);
    }
}

#[test]
fn oversize_length_is_rejected_from_the_header_alone() {
    let mut dec = Decoder::with_max_frame(1000);
    // Only the header: the body is never waited for.
    dec.feed(&header(PROTOCOL_VERSION, MessageType::Flows as u16, 1001));
    let err = dec.decode().unwrap_err();
    assert_eq!(
        err,
        DecodeError::FrameTooLarge {
            len: 1001,
            max: 1000
        }
    );
    assert!(err.is_fatal());
    // Sticky: the stream is out of step for good.
    dec.feed(&encode_all(&[Message::Heartbeat]));
    assert_eq!(dec.decode().unwrap_err(), err);
    assert_eq!(dec.buffered(), 0, "a failed decoder buffers nothing");

    // The default limit, and the largest length there is.
    let mut dec = Decoder::new();
    dec.feed(&header(PROTOCOL_VERSION, 2, u32::MAX));
    assert_eq!(
        dec.decode().unwrap_err(),
        DecodeError::FrameTooLarge {
            len: u32::MAX,
            max: DEFAULT_MAX_FRAME
        }
    );
    // A frame exactly at the limit is fine.
    let mut dec = Decoder::with_max_frame(2);
    dec.feed(&encode_all(&[Message::Heartbeat]));
    assert_eq!(dec.decode().unwrap(), Some(Message::Heartbeat));
}

/// A reader that buffers ahead without decoding (the sync while it writes or applies)
/// checks the headers of what it buffered: a bad one behind good frames is refused at once,
/// good frames and a body still coming pass, and the frames decode afterwards as usual.
#[test]
fn buffered_headers_are_checked_without_decoding() {
    let good = encode_all(&every_message());
    let mut dec = Decoder::with_max_frame(1 << 20);
    dec.feed(&good);
    // And the first half of another frame.
    let more = encode_all(&[Message::Heartbeat, Message::Heartbeat]);
    dec.feed(&more[..more.len() / 2 + 7]);
    assert_eq!(dec.check_buffered(), Ok(()));
    assert_eq!(dec.check_buffered(), Ok(()), "checked again: nothing new");
    assert_eq!(decode_all(&mut dec).len(), every_message().len() + 1);
    dec.feed(&more[more.len() / 2 + 7..]);
    assert_eq!(dec.check_buffered(), Ok(()));
    assert_eq!(dec.decode().unwrap(), Some(Message::Heartbeat));

    let mut dec = Decoder::with_max_frame(1000);
    dec.feed(&good);
    dec.feed(&header(PROTOCOL_VERSION, MessageType::Flows as u16, 1001));
    let fresh = {
        let mut d = Decoder::with_max_frame(1000);
        d.feed(&good);
        d.check_buffered()
    };
    assert_eq!(fresh, Ok(()), "the good frames alone pass");
    let err = dec.check_buffered().unwrap_err();
    assert!(err.is_fatal(), "{err:?}");
    assert_eq!(dec.decode().unwrap_err(), err, "sticky, as decode's own");
    // A wrong magic is refused from its first bytes.
    let mut dec = Decoder::new();
    dec.feed(&good);
    dec.feed(b"GE");
    assert!(matches!(
        dec.check_buffered(),
        Err(DecodeError::BadMagic { .. })
    ));
}

#[test]
fn the_encoder_refuses_what_the_peer_would() {
    let enc = Encoder::with_max_frame(100);
    let mut out = b"earlier".to_vec();
    let big = Message::Observations(Observations {
        seq: 1,
        items: (0..10).map(observation).collect(),
    });
    let err = enc.encode(&big, &mut out).unwrap_err();
    assert!(
        matches!(err, EncodeError::TooLarge { ty: MessageType::Observations, max: 100, len } if len > 100),
        "{err}"
    );
    assert_eq!(out, b"earlier", "nothing appended on error");
    enc.encode(&Message::Heartbeat, &mut out).unwrap();
}

#[test]
fn garbage_and_other_versions_are_fatal_with_a_clear_line() {
    // HTTP on the socket: refused at the first byte.
    let mut dec = Decoder::new();
    dec.feed(b"G");
    let err = dec.decode().unwrap_err();
    assert!(matches!(err, DecodeError::BadMagic { .. }) && err.is_fatal());
    assert!(err.to_string().contains("not a dnsfence frame"), "{err}");
    assert!(!err.to_string().contains('\n'));

    let mut dec = Decoder::new();
    dec.feed(b"DFSYxxxxxxxx");
    assert!(matches!(
        dec.decode(),
        Err(DecodeError::UnsupportedVersion { .. })
    ));

    let mut dec = Decoder::new();
    dec.feed(&header(PROTOCOL_VERSION + 1, 1, 2));
    let err = dec.decode().unwrap_err();
    assert_eq!(err, DecodeError::UnsupportedVersion { found: 2 });
    assert!(err.is_fatal());
    let line = err.to_string();
    assert!(
        line.contains("protocol version 2") && line.contains("speaks 1"),
        "{line}"
    );
}

#[test]
fn unknown_types_and_bad_bodies_are_skipped() {
    let mut bytes = header(PROTOCOL_VERSION, 999, 5);
    bytes.extend_from_slice(b"{\"a\":");
    // A known type with a body of the wrong shape, then one that is not JSON.
    bytes.extend(header(PROTOCOL_VERSION, MessageType::SnapshotAck as u16, 2));
    bytes.extend_from_slice(b"[]");
    bytes.extend(header(PROTOCOL_VERSION, MessageType::Heartbeat as u16, 1));
    bytes.extend_from_slice(b"{");
    bytes.extend(encode_all(&[Message::FlowsAck(FlowsAck { seq: 4 })]));
    // Unknown fields (a newer peer's additions) are ignored.
    let newer = br#"{"seq":5,"added_later":[1,2]}"#;
    bytes.extend(header(
        PROTOCOL_VERSION,
        MessageType::ObservationsAck as u16,
        newer.len() as u32,
    ));
    bytes.extend_from_slice(newer);

    let mut dec = Decoder::new();
    dec.feed(&bytes);
    let err = dec.decode().unwrap_err();
    assert_eq!(err, DecodeError::UnknownType { ty: 999, len: 5 });
    assert!(!err.is_fatal());
    let err = dec.decode().unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::BadBody {
                ty: MessageType::SnapshotAck,
                ..
            }
        ) && !err.is_fatal(),
        "{err}"
    );
    assert!(matches!(
        dec.decode(),
        Err(DecodeError::BadBody {
            ty: MessageType::Heartbeat,
            ..
        })
    ));
    assert_eq!(
        dec.decode().unwrap(),
        Some(Message::FlowsAck(FlowsAck { seq: 4 }))
    );
    assert_eq!(
        dec.decode().unwrap(),
        Some(Message::ObservationsAck(ObservationsAck { seq: 5 }))
    );
    assert_eq!(dec.decode().unwrap(), None);
}

#[test]
fn hex_keys_must_be_16_hex_digits() {
    for bad in [
        r#""12""#,
        r#""0x00000000000001""#,
        r#"1"#,
        r#""000000000000000g""#,
    ] {
        let body = format!(r#"{{"role":"agent","protocol_version":1,"pid":1,"instance":{bad}}}"#);
        let mut bytes = header(PROTOCOL_VERSION, 1, body.len() as u32);
        bytes.extend_from_slice(body.as_bytes());
        let mut dec = Decoder::new();
        dec.feed(&bytes);
        assert!(
            matches!(dec.decode(), Err(DecodeError::BadBody { .. })),
            "{bad}"
        );
    }
}

#[test]
fn the_instance_is_one_per_process() {
    assert_eq!(process_instance(), process_instance());
    let h = Hello::new(Role::Proxy);
    assert_eq!(h.instance, process_instance());
    assert_eq!(h.pid, std::process::id());
    assert_eq!(h.protocol_version, PROTOCOL_VERSION);
}

#[test]
fn message_types_are_numbered_for_good() {
    // Renumbering breaks every deployed peer: this list only grows.
    let wire: Vec<u16> = MessageType::ALL.iter().map(|t| *t as u16).collect();
    assert_eq!(wire, [1, 2, 3, 4, 5, 6, 7, 8]);
    for t in MessageType::ALL {
        assert_eq!(MessageType::from_wire(t as u16), Some(t));
    }
    assert_eq!(MessageType::from_wire(0), None);
    assert_eq!(MessageType::from_wire(9), None);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Random bytes, fed in random pieces, never panic the decoder, and it never buffers
    /// more than was fed.
    #[test]
    fn random_bytes_never_panic(
        data in proptest::collection::vec(any::<u8>(), 0..512),
        cuts in proptest::collection::vec(0usize..512, 0..8),
        valid_prefix in any::<bool>(),
    ) {
        let mut bytes = Vec::new();
        if valid_prefix {
            // Random bodies behind a valid header get past the framing into serde_json.
            let ty = 1 + (data.first().copied().unwrap_or(0) % 9) as u16;
            bytes.extend(header(PROTOCOL_VERSION, ty, data.len() as u32));
        }
        bytes.extend_from_slice(&data);
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
        cuts.push(bytes.len());
        cuts.sort();
        let mut dec = Decoder::with_max_frame(256);
        let mut last = 0;
        for cut in cuts {
            dec.feed(&bytes[last..cut]);
            last = cut;
            prop_assert!(dec.buffered() <= bytes.len());
            for _ in 0..bytes.len() + 1 {
                match dec.decode() {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) if e.is_fatal() => break,
                    Err(_) => {}
                }
            }
        }
    }

    /// Valid frames survive any split into pieces.
    #[test]
    fn any_split_round_trips(cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..16)) {
        let msgs = every_message();
        let bytes = encode_all(&msgs);
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        cuts.push(bytes.len());
        cuts.sort();
        let mut dec = Decoder::new();
        let mut got = Vec::new();
        let mut last = 0;
        for cut in cuts {
            dec.feed(&bytes[last..cut]);
            last = cut;
            got.extend(decode_all(&mut dec));
        }
        prop_assert_eq!(got, msgs);
    }
}

#[test]
fn a_large_frame_does_not_pin_its_memory() {
    let big = Message::PolicySnapshot(PolicySnapshot {
        version: 1,
        policy_files: vec![SourceFile {
            path: "big.yaml".into(),
            content: "x".repeat(4 << 20),
        }],
        endpoints: SourceFile {
            path: "e.yaml".into(),
            content: String::new(),
        },
        node: NodeFacts::default(),
        policy_id: 0,
    });
    let bytes = encode_all(std::slice::from_ref(&big));
    let mut dec = Decoder::new();
    dec.feed(&bytes);
    assert_eq!(dec.decode().unwrap(), Some(big));
    assert!(dec.buffer_capacity() >= 4 << 20);
    dec.feed(&encode_all(&[Message::Heartbeat]));
    assert!(
        dec.buffer_capacity() <= 1 << 20,
        "{}",
        dec.buffer_capacity()
    );
    assert_eq!(dec.decode().unwrap(), Some(Message::Heartbeat));
}

/// Any address, its longest spellings included (IPv4-mapped IPv6 prints a dotted quad).
fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(IpAddr::from),
        any::<[u8; 16]>().prop_map(IpAddr::from),
        Just(
            "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"
                .parse()
                .unwrap()
        ),
        Just("::ffff:255.255.255.255".parse().unwrap()),
    ]
}

/// Any socket address, scoped IPv6 with the largest scope included.
fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    (ip(), any::<u16>(), any::<u32>(), any::<u32>()).prop_map(|(ip, port, flow, scope)| match ip {
        IpAddr::V4(v4) => SocketAddr::from((v4, port)),
        IpAddr::V6(v6) => SocketAddr::V6(std::net::SocketAddrV6::new(v6, port, flow, scope)),
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// The replay buffer's weight of an item is at least its JSON encoding and the comma
    /// after it (what the buffer holds must fit the state file it is persisted to): names
    /// full of quotes, backslashes and control characters, the longest address spellings,
    /// the largest numbers.
    #[test]
    fn json_bounds_cover_the_encoding(
        name in "(\\PC|[\"\\\\\\x00-\\x1f]){0,80}",
        verdict in "(\\PC|[\"\\x00-\\x1f]){0,12}",
        served_by in "(\\PC|[\"\\x00-\\x1f]){0,12}",
        addresses in proptest::collection::vec(ip(), 0..40),
        client in socket_addr(),
        numbers in any::<(u64, u64, u64, u32, u16, u16, bool)>(),
        key in proptest::option::of(any::<u64>()),
    ) {
        let (a, b, c, ttl, qtype, rcode, dropped) = numbers;
        let observation = Observation {
            endpoint_key: a,
            name: name.clone(),
            addresses: addresses.clone(),
            ttl_secs: ttl,
            observed_unix_ms: b,
        };
        let encoded = serde_json::to_vec(&observation).unwrap().len() + 1;
        prop_assert!(encoded <= observation.json_bound(), "{} > {}", encoded, observation.json_bound());
        let flow = FlowRecord {
            unix_ms: a,
            client,
            endpoint_key: key,
            name,
            qtype,
            verdict,
            rcode,
            dropped,
            addresses,
            ttl,
            latency_us: c,
            served_by,
        };
        let encoded = serde_json::to_vec(&flow).unwrap().len() + 1;
        prop_assert!(encoded <= flow.json_bound(), "{} > {}", encoded, flow.json_bound());
    }
}

/// The worst cases one at a time, each of which a looser bound misses: a name of control
/// characters only, every address at its longest spelling, every number at its largest.
#[test]
fn json_bounds_cover_the_worst_cases() {
    let long: IpAddr = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"
        .parse()
        .unwrap();
    let client = SocketAddr::V6(std::net::SocketAddrV6::new(
        "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"
            .parse()
            .unwrap(),
        u16::MAX,
        u32::MAX,
        u32::MAX,
    ));
    for name in ["\u{1}".repeat(253), "\"".repeat(253), String::new()] {
        for addresses in [vec![long; 256], vec![IpAddr::from([255; 4]); 256], vec![]] {
            let observation = Observation {
                endpoint_key: u64::MAX,
                name: name.clone(),
                addresses: addresses.clone(),
                ttl_secs: u32::MAX,
                observed_unix_ms: u64::MAX,
            };
            let encoded = serde_json::to_vec(&observation).unwrap().len() + 1;
            assert!(encoded <= observation.json_bound());
            // Tight: within the fixed part's slack.
            assert!(observation.json_bound() - encoded <= 64, "{encoded}");
            let flow = FlowRecord {
                unix_ms: u64::MAX,
                client,
                endpoint_key: Some(u64::MAX),
                name: name.clone(),
                qtype: u16::MAX,
                verdict: "\u{1f}".repeat(16),
                rcode: u16::MAX,
                dropped: false,
                addresses,
                ttl: u32::MAX,
                latency_us: u64::MAX,
                served_by: "\\".repeat(16),
            };
            let encoded = serde_json::to_vec(&flow).unwrap().len() + 1;
            assert!(encoded <= flow.json_bound());
            assert!(flow.json_bound() - encoded <= 128, "{encoded}");
        }
    }
}

/// Review finding: frames were bounded at 64 MiB while a state file holds 256 MiB, so a large
/// cluster's policy snapshot (rendered policies and endpoints: tens of MiB) that the proxy
/// could persist could never be sent. A 100 MiB snapshot goes through with the defaults.
#[test]
fn a_snapshot_the_proxy_could_persist_can_be_sent() {
    let big = Message::PolicySnapshot(PolicySnapshot {
        version: 1,
        policy_files: vec![SourceFile {
            path: "cluster.yaml".into(),
            content: "x".repeat(100 << 20),
        }],
        endpoints: SourceFile {
            path: String::new(),
            content: String::new(),
        },
        node: NodeFacts::default(),
        policy_id: 1,
    });
    let bytes = encode_all(std::slice::from_ref(&big));
    let mut dec = Decoder::new();
    dec.feed(&bytes);
    drop(bytes);
    assert!(
        dec.decode().unwrap() == Some(big),
        "the snapshot decodes whole"
    );
}
