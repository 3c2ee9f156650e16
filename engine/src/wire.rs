//! Zero-copy DNS wire format: just what the data path needs, on borrowed bytes.
//!
//! - [`parse_query`]: header and question of a client query, structurally validated.
//! - [`write_reply`]: a header-and-question answer (REFUSED, NXDOMAIN, SERVFAIL, FORMERR)
//!   written in place over the query's own buffer.
//! - [`parse_answer`]: an upstream answer's header and question, then [`collect_addresses`]:
//!   the A/AAAA records on the CNAME chain of the question, and the chain's minimum TTL.
//!
//! Every length and count is checked before use; malformed input is an error value naming
//! what was wrong, never a panic. Nothing here allocates.
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use dnsfence_matcher::MAX_WIRE_LEN;

/// Length of the DNS header.
pub const HEADER_LEN: usize = 12;
/// Record type A.
pub const TYPE_A: u16 = 1;
/// Record type CNAME.
pub const TYPE_CNAME: u16 = 5;
/// Record type AAAA.
pub const TYPE_AAAA: u16 = 28;
/// Record type OPT (EDNS0).
pub const TYPE_OPT: u16 = 41;
/// Class IN.
pub const CLASS_IN: u16 = 1;

/// Response codes dnsfence writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Rcode {
    /// No error.
    NoError = 0,
    /// The query could not be interpreted.
    FormErr = 1,
    /// The server failed (upstream timeout or unreachable).
    ServFail = 2,
    /// The name does not exist (the `--reject-rcode nxdomain` answer to a denied query).
    NxDomain = 3,
    /// The operation is not implemented (opcodes other than QUERY).
    NotImp = 4,
    /// Refused by policy.
    Refused = 5,
}

const QR: u16 = 0x8000;
const OPCODE_MASK: u16 = 0x7800;
const AA: u16 = 0x0400;
const TC: u16 = 0x0200;
const RD: u16 = 0x0100;
const RA: u16 = 0x0080;
const RCODE_MASK: u16 = 0x000F;

/// Why a query was not accepted. Each is a counted verdict of the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryError {
    /// Shorter than a DNS header: dropped, there is no ID to answer.
    ShortHeader,
    /// The QR bit is set: this is a response, not a query. Dropped, never answered: answering
    /// a response invites a reflection loop (two servers on one SO_REUSEPORT port, or a
    /// spoofed source), which is why DNS servers ignore them.
    ResponseBit,
    /// The opcode is not QUERY (answered NOTIMP).
    Opcode,
    /// QDCOUNT is not 1.
    QuestionCount,
    /// The question name is malformed (bad label length, compression, too long, truncated).
    BadName,
    /// The packet ends inside the question's type or class.
    ShortQuestion,
    /// The question class is not a defined class.
    UnknownClass,
}

impl QueryError {
    /// The rcode to answer with, or `None` when the packet must be dropped.
    pub fn rcode(self) -> Option<Rcode> {
        match self {
            QueryError::ShortHeader | QueryError::ResponseBit => None,
            QueryError::Opcode => Some(Rcode::NotImp),
            _ => Some(Rcode::FormErr),
        }
    }
}

fn u16_at(packet: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*packet.get(at)?, *packet.get(at + 1)?]))
}

fn u32_at(packet: &[u8], at: usize) -> Option<u32> {
    let b = packet.get(at..at + 4)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// The ID of a packet at least [`HEADER_LEN`] bytes long.
pub fn id(packet: &[u8]) -> Option<u16> {
    (packet.len() >= HEADER_LEN)
        .then(|| u16_at(packet, 0))
        .flatten()
}

/// Overwrites the ID of a packet at least two bytes long.
pub fn set_id(packet: &mut [u8], id: u16) {
    packet[..2].copy_from_slice(&id.to_be_bytes());
}

/// A structurally valid query: header and question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query {
    /// The client's ID.
    pub id: u16,
    /// The header flags word.
    pub flags: u16,
    /// Question type.
    pub qtype: u16,
    /// Question class.
    pub qclass: u16,
    /// Length of the question name in wire form (it starts at [`HEADER_LEN`]).
    pub name_len: usize,
    /// Offset just after the question (name, type, class).
    pub question_end: usize,
    /// Offset and length of a well-formed EDNS0 OPT record that is the only additional record
    /// (and nothing else follows the question), kept in replies written in place.
    pub opt: Option<(usize, usize)>,
}

impl Query {
    /// The question name's wire bytes as the client spelled them.
    pub fn name_wire<'p>(&self, packet: &'p [u8]) -> &'p [u8] {
        &packet[HEADER_LEN..HEADER_LEN + self.name_len]
    }

    /// Whether the client asked for recursion.
    pub fn recursion_desired(&self) -> bool {
        self.flags & RD != 0
    }
}

/// Validates the length bytes of an uncompressed name at `at`; returns its length.
fn uncompressed_name_len(packet: &[u8], at: usize) -> Option<usize> {
    let mut pos = at;
    loop {
        let len = *packet.get(pos)?;
        if len == 0 {
            return Some(pos + 1 - at);
        }
        if len & 0xC0 != 0 {
            return None;
        }
        pos += 1 + usize::from(len);
        if pos - at + 1 > MAX_WIRE_LEN {
            return None;
        }
    }
}

/// Parses the header and question of a client query.
pub fn parse_query(packet: &[u8]) -> Result<Query, QueryError> {
    if packet.len() < HEADER_LEN {
        return Err(QueryError::ShortHeader);
    }
    let field = |at| u16_at(packet, at).unwrap_or(0);
    let (id, flags, qdcount) = (field(0), field(2), field(4));
    if flags & QR != 0 {
        return Err(QueryError::ResponseBit);
    }
    if flags & OPCODE_MASK != 0 {
        return Err(QueryError::Opcode);
    }
    if qdcount != 1 {
        return Err(QueryError::QuestionCount);
    }
    let name_len = uncompressed_name_len(packet, HEADER_LEN).ok_or(QueryError::BadName)?;
    let after_name = HEADER_LEN + name_len;
    let (Some(qtype), Some(qclass)) = (u16_at(packet, after_name), u16_at(packet, after_name + 2))
    else {
        return Err(QueryError::ShortQuestion);
    };
    // IN, CH, HS, NONE, ANY are defined; anything else is not a class.
    if !matches!(qclass, 1 | 3 | 4 | 254 | 255) {
        return Err(QueryError::UnknownClass);
    }
    let question_end = after_name + 4;
    let opt = find_lone_opt(packet, question_end);
    Ok(Query {
        id,
        flags,
        qtype,
        qclass,
        name_len,
        question_end,
        opt,
    })
}

/// An OPT record that is the only record after the question, or `None`.
fn find_lone_opt(packet: &[u8], question_end: usize) -> Option<(usize, usize)> {
    let (an, ns, ar) = (u16_at(packet, 6)?, u16_at(packet, 8)?, u16_at(packet, 10)?);
    if an != 0 || ns != 0 || ar != 1 {
        return None;
    }
    // Root owner name, type OPT, class (UDP size), TTL (ext-rcode, version, flags), RDLENGTH.
    if *packet.get(question_end)? != 0 || u16_at(packet, question_end + 1)? != TYPE_OPT {
        return None;
    }
    let rdlen = usize::from(u16_at(packet, question_end + 9)?);
    let len = 11 + rdlen;
    (question_end + len == packet.len()).then_some((question_end, len))
}

/// The EDNS0 parameters of a query that replies and forwarded copies carry over: nothing
/// else of the client's OPT record (no cookie, no unknown option) is ever echoed or forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edns {
    /// The UDP payload size (the OPT record's class).
    pub payload: u16,
    /// The DO bit (RFC 3225: copied into the reply).
    pub dnssec_ok: bool,
}

/// Length of a minimal OPT record: root owner, type, class, TTL, empty RDATA.
pub const OPT_LEN: usize = 11;

/// The EDNS0 parameters of `query` (in `packet`): from its lone OPT record, else from the first
/// OPT record of its additional section. `None` when it has none.
pub fn query_edns(packet: &[u8], query: &Query) -> Option<Edns> {
    let at = match query.opt {
        Some((at, _)) => at,
        None if u16_at(packet, 10)? != 0 => find_opt(packet, query.question_end)?,
        None => return None,
    };
    edns_at(packet, at)
}

/// The EDNS0 parameters of the OPT record at `at`.
fn edns_at(packet: &[u8], at: usize) -> Option<Edns> {
    Some(Edns {
        payload: u16_at(packet, at + 3)?,
        dnssec_ok: *packet.get(at + 7)? & 0x80 != 0,
    })
}

/// Writes a minimal OPT record (version 0, extended rcode 0, only the DO bit) at the start of
/// `out`, which must hold [`OPT_LEN`] bytes. Returns [`OPT_LEN`].
pub fn write_opt(out: &mut [u8], edns: Edns) -> usize {
    out[..OPT_LEN].copy_from_slice(&opt_record(edns));
    OPT_LEN
}

/// Rewrites `packet` (holding `query`) in place into a reply with `rcode`: same ID and
/// question, QR set, RD copied, RA set when `recursion_available`, no records except a minimal
/// OPT record (see [`write_opt`]) when the query had one (`edns`, from [`query_edns`]; RFC 6891
/// §7). Returns the reply length.
pub fn write_reply(
    packet: &mut [u8],
    query: &Query,
    rcode: Rcode,
    recursion_available: bool,
    edns: Option<Edns>,
) -> usize {
    let mut flags = QR | (query.flags & RD) | rcode as u16;
    if recursion_available {
        flags |= RA;
    }
    packet[2..4].copy_from_slice(&flags.to_be_bytes());
    packet[4..6].copy_from_slice(&1u16.to_be_bytes());
    packet[6..10].fill(0);
    let len = query.question_end;
    match edns {
        // A query with an OPT record has at least OPT_LEN bytes after its question.
        Some(edns) if packet.len() >= len + OPT_LEN => {
            packet[10..12].copy_from_slice(&1u16.to_be_bytes());
            len + write_opt(&mut packet[len..], edns)
        }
        _ => {
            packet[10..12].fill(0);
            len
        }
    }
}

/// The offset of the first OPT record in the additional section of a message whose question
/// ends at `question_end`, walking every record before it; `None` when there is none or the
/// records are malformed.
pub fn find_opt(packet: &[u8], question_end: usize) -> Option<usize> {
    let (an, ns, ar) = (u16_at(packet, 6)?, u16_at(packet, 8)?, u16_at(packet, 10)?);
    let mut pos = question_end;
    for i in 0..u32::from(an) + u32::from(ns) + u32::from(ar) {
        let after_owner = skip_name(packet, pos)?;
        let rtype = u16_at(packet, after_owner)?;
        let rdlen = usize::from(u16_at(packet, after_owner + 8)?);
        if i >= u32::from(an) + u32::from(ns) && rtype == TYPE_OPT {
            return Some(pos);
        }
        pos = after_owner + 10 + rdlen;
        if pos > packet.len() {
            return None;
        }
    }
    None
}

/// Lowers the UDP payload size of the OPT record at `opt_at` (as found by [`parse_query`]) to
/// `max` when it advertises more.
pub fn clamp_edns_payload(packet: &mut [u8], opt_at: usize, max: u16) {
    // Root owner (1 byte), TYPE (2), then CLASS carries the payload size.
    let at = opt_at + 3;
    if let Some(field) = packet.get_mut(at..at + 2) {
        let size = u16::from_be_bytes([field[0], field[1]]);
        if size > max {
            field.copy_from_slice(&max.to_be_bytes());
        }
    }
}

/// The EDNS0 parameters of a query [`parse_query`] refused, when its records can still be
/// walked: no question (QDCOUNT 0), or one uncompressed question whatever its class or the
/// opcode. `None` when it has no OPT or its layout cannot be trusted (a FORMERR for a broken
/// question then goes without OPT, as RFC 6891 §7 allows for a message it cannot parse).
pub fn malformed_query_edns(packet: &[u8]) -> Option<Edns> {
    let question_end = match u16_at(packet, 4)? {
        0 => HEADER_LEN,
        1 => HEADER_LEN + uncompressed_name_len(packet, HEADER_LEN)? + 4,
        _ => return None,
    };
    if u16_at(packet, 10)? == 0 || question_end > packet.len() {
        return None;
    }
    let at = find_opt(packet, question_end)?;
    edns_at(packet, at)
}

/// Writes a FORMERR/NOTIMP reply over a packet whose question could not be trusted: the header
/// only, all counts zero. `packet` must be at least [`HEADER_LEN`] bytes long.
pub fn write_header_reply(packet: &mut [u8], rcode: Rcode) -> usize {
    let flags = u16_at(packet, 2).unwrap_or(0);
    let flags = QR | (flags & (OPCODE_MASK | RD)) | rcode as u16;
    packet[2..4].copy_from_slice(&flags.to_be_bytes());
    packet[4..12].fill(0);
    HEADER_LEN
}

/// Writes a reply from a stored question (header + question, and a minimal OPT record when
/// `edns` is given) into `out`, which must hold them. `question` is the question name's wire
/// form followed by type and class.
pub fn write_reply_from_question(
    out: &mut [u8],
    id: u16,
    client_flags: u16,
    question: &[u8],
    rcode: Rcode,
    edns: Option<Edns>,
) -> usize {
    let flags = QR | RA | (client_flags & RD) | rcode as u16;
    write_query_from_question(out, id, flags, question, edns)
}

/// The header of a message with one question and no records but an optional OPT record.
#[inline(always)]
pub fn one_question_header(id: u16, flags: u16, opt: bool) -> [u8; HEADER_LEN] {
    let [i0, i1] = id.to_be_bytes();
    let [f0, f1] = flags.to_be_bytes();
    [i0, i1, f0, f1, 0, 1, 0, 0, 0, 0, 0, u8::from(opt)]
}

/// A minimal OPT record (version 0, extended rcode 0, only the DO bit).
#[inline(always)]
pub fn opt_record(edns: Edns) -> [u8; OPT_LEN] {
    let [p0, p1] = edns.payload.to_be_bytes();
    let flags = if edns.dnssec_ok { 0x80 } else { 0 };
    [0, 0, TYPE_OPT as u8, p0, p1, 0, 0, flags, 0, 0, 0]
}

/// Writes a message with one question and no records but an optional minimal OPT record:
/// a forwarded query (no record of the client's other than its EDNS0 parameters goes
/// upstream) or a locally generated reply. `out` must hold `HEADER_LEN + question.len()`
/// bytes, plus [`OPT_LEN`] with `edns`. Returns the length written.
pub fn write_query_from_question(
    out: &mut [u8],
    id: u16,
    flags: u16,
    question: &[u8],
    edns: Option<Edns>,
) -> usize {
    out[..HEADER_LEN].copy_from_slice(&one_question_header(id, flags, edns.is_some()));
    let len = HEADER_LEN + question.len();
    out[HEADER_LEN..len].copy_from_slice(question);
    match edns {
        Some(edns) => len + write_opt(&mut out[len..], edns),
        None => len,
    }
}

/// Why an upstream answer was not accepted. Each is a counted verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerError {
    /// Shorter than a header, or the QR bit is clear.
    NotAResponse,
    /// QDCOUNT is not 1 or the question is malformed.
    BadQuestion,
    /// A record of the answer section is malformed (truncated, bad name, pointer loop).
    BadRecord,
}

/// The header and question of an upstream answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// The upstream-facing ID.
    pub id: u16,
    /// Header flags.
    pub flags: u16,
    /// Question type and class.
    pub qtype: u16,
    /// Question class.
    pub qclass: u16,
    /// Question name length (uncompressed, at [`HEADER_LEN`]).
    pub name_len: usize,
    /// Offset just after the question.
    pub question_end: usize,
    /// ANCOUNT.
    pub answers: u16,
}

impl Answer {
    /// The response code (low four bits; extended rcodes are not looked at).
    pub fn rcode(&self) -> u8 {
        (self.flags & RCODE_MASK) as u8
    }

    /// Whether the TC bit is set.
    pub fn truncated(&self) -> bool {
        self.flags & TC != 0
    }

    /// Whether the AA bit is set.
    pub fn authoritative(&self) -> bool {
        self.flags & AA != 0
    }

    /// The question name's wire bytes.
    pub fn name_wire<'p>(&self, packet: &'p [u8]) -> &'p [u8] {
        &packet[HEADER_LEN..HEADER_LEN + self.name_len]
    }
}

/// Parses an upstream answer's header and question (uncompressed, as every server writes it).
pub fn parse_answer(packet: &[u8]) -> Result<Answer, AnswerError> {
    if packet.len() < HEADER_LEN {
        return Err(AnswerError::NotAResponse);
    }
    let field = |at| u16_at(packet, at).unwrap_or(0);
    let (id, flags, qdcount, answers) = (field(0), field(2), field(4), field(6));
    if flags & QR == 0 {
        return Err(AnswerError::NotAResponse);
    }
    if qdcount != 1 {
        return Err(AnswerError::BadQuestion);
    }
    let name_len = uncompressed_name_len(packet, HEADER_LEN).ok_or(AnswerError::BadQuestion)?;
    let after = HEADER_LEN + name_len;
    let (Some(qtype), Some(qclass)) = (u16_at(packet, after), u16_at(packet, after + 2)) else {
        return Err(AnswerError::BadQuestion);
    };
    Ok(Answer {
        id,
        flags,
        qtype,
        qclass,
        name_len,
        question_end: after + 4,
        answers,
    })
}

/// The case bits of a 0x20 spelling for the 64-byte block `block` of a name: the seed for the
/// first, splitmix64 steps from it for the next ones (names longer than 64 bytes).
#[inline(always)]
fn case_word(seed: u64, block: usize) -> u64 {
    let mut bits = seed;
    for _ in 0..block {
        bits = bits.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = bits;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        bits = z ^ (z >> 31);
    }
    bits
}

/// Eight name bytes (little-endian in `w`) in their 0x20 spelling: in every letter byte, bit 5
/// (set: lowercase) becomes the complement of bit 5 of the same byte of `case`; other bytes
/// (length bytes are at most 63, below every letter; digits, `-`, `_`, bytes >= 0x80) stay.
/// Eight bytes per step: a few instructions per byte on the allowed path, twice per query.
#[inline(always)]
fn spell8(w: u64, case: u64) -> u64 {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    const BIT5: u64 = 0x2020_2020_2020_2020;
    let lower = w | BIT5;
    let t = lower & LOW7;
    // Per byte (no carry: t <= 0x7f): t + 0x1f >= 0x80 iff t >= 'a'; t + 0x05 >= 0x80 iff
    // t > 'z'; and the byte itself below 0x80.
    let letter = t.wrapping_add(0x1f1f_1f1f_1f1f_1f1f)
        & !t.wrapping_add(0x0505_0505_0505_0505)
        & !lower
        & HIGH;
    let letter5 = letter >> 2;
    (w & !letter5) | (!case & letter5)
}

/// The little-endian word of `b[at..at + 8]`.
#[inline(always)]
fn word_at(b: &[u8], at: usize) -> u64 {
    // Through an array (a plain load), not `copy_from_slice` (a `memcpy` call when not inlined).
    let bytes: [u8; 8] = b[at..at + 8].try_into().unwrap_or([0; 8]);
    u64::from_le_bytes(bytes)
}

/// Stores `w` little-endian at `b[at..at + 8]` (a plain store).
#[inline(always)]
fn set_word_at(b: &mut [u8], at: usize, w: u64) {
    if let Ok(dst) = <&mut [u8; 8]>::try_from(&mut b[at..at + 8]) {
        *dst = w.to_le_bytes();
    }
}

/// The last `k` (1..=7) bytes of `b` as a little-endian word, zero-padded: one load of the
/// last eight bytes when there are eight, else byte by byte.
#[inline(always)]
fn tail_word(b: &[u8], k: usize) -> u64 {
    let n = b.len();
    if n >= 8 {
        word_at(b, n - 8) >> (8 * (8 - k))
    } else {
        let mut w = 0u64;
        for j in 0..k {
            w |= u64::from(b[n - k + j]) << (8 * j);
        }
        w
    }
}

/// The case word of 8-byte chunk `c` of a name: byte `j` of chunk `c` of a 64-byte block
/// takes its case from bit `(8j + 5 + c) % 64` of the block's word (one bit per position).
#[inline(always)]
fn chunk_case(seed: u64, word: &mut u64, c: usize) -> u64 {
    if c >= 8 && c.is_multiple_of(8) {
        *word = case_word(seed, c / 8);
    }
    word.rotate_right(c as u32 & 7)
}

/// Sets the case of every letter of an uncompressed wire name from `seed` (DNS 0x20,
/// draft-vixie-dnsext-dns0x20): a resolver that echoes the question exactly proves it saw this
/// query, so an off-path spoofer must guess one more bit per letter. Length bytes are left
/// alone (they are below `A`).
pub fn apply_0x20(name: &mut [u8], seed: u64) {
    let n = name.len();
    let mut word = seed;
    let (mut at, mut c) = (0, 0);
    while at + 8 <= n {
        let spelled = spell8(word_at(name, at), chunk_case(seed, &mut word, c));
        set_word_at(name, at, spelled);
        at += 8;
        c += 1;
    }
    let k = n - at;
    if k > 0 {
        let spelled = spell8(tail_word(name, k), chunk_case(seed, &mut word, c));
        if n >= 8 {
            // Rewrite the last eight bytes: the ones before the tail as they are.
            let shift = 8 * (8 - k);
            let last = word_at(name, n - 8);
            let merged = (last & ((1u64 << shift) - 1)) | (spelled << shift);
            set_word_at(name, n - 8, merged);
        } else {
            for j in 0..k {
                name[at + j] = (spelled >> (8 * j)) as u8;
            }
        }
    }
}

/// Whether `received` is exactly `name` (any case) in the 0x20 spelling of `seed`, i.e. what
/// [`apply_0x20`] makes of it; without a copy.
pub fn is_0x20_spelling(received: &[u8], name: &[u8], seed: u64) -> bool {
    let n = name.len();
    if received.len() != n {
        return false;
    }
    let mut word = seed;
    let mut differ = 0u64;
    let (mut at, mut c) = (0, 0);
    while at + 8 <= n {
        let case = chunk_case(seed, &mut word, c);
        differ |= word_at(received, at) ^ spell8(word_at(name, at), case);
        at += 8;
        c += 1;
    }
    let k = n - at;
    if k > 0 {
        let case = chunk_case(seed, &mut word, c);
        differ |= tail_word(received, k) ^ spell8(tail_word(name, k), case);
    }
    differ == 0
}

/// Whether a wire name has both an uppercase and a lowercase ASCII letter: only such a 0x20
/// spelling, echoed exactly, shows that an upstream preserves case (one that lowercases or
/// uppercases names echoes a spelling without letters, or all of one case, unchanged).
/// Label length bytes (below 64) are never letters.
pub fn has_mixed_case(name: &[u8]) -> bool {
    name.iter().any(u8::is_ascii_uppercase) && name.iter().any(u8::is_ascii_lowercase)
}

/// Case-insensitive comparison of two uncompressed wire names.
pub fn names_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.eq_ignore_ascii_case(b)
}

/// A name decompressed into a fixed buffer, lowercased.
#[derive(Clone, Copy)]
struct FlatName {
    buf: [u8; MAX_WIRE_LEN],
    len: usize,
}

impl FlatName {
    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Most compression pointers followed in one name. Pointers must also point strictly
/// backwards (which rules out loops), but a 64 KiB message could still chain thousands of
/// them; no real name needs more than a handful.
pub const MAX_POINTER_HOPS: usize = 128;

/// Reads a possibly compressed name at `at`. Pointers must point strictly backwards (which
/// also rules out loops), at most [`MAX_POINTER_HOPS`] of them. Returns the name and the
/// offset after it in the record.
fn read_name(packet: &[u8], at: usize) -> Option<(FlatName, usize)> {
    let mut name = FlatName {
        buf: [0; MAX_WIRE_LEN],
        len: 0,
    };
    let mut pos = at;
    let mut end = None;
    // Every pointer must go to a smaller offset than the one it sits at.
    let mut limit = at;
    let mut hops = 0;
    loop {
        let len = *packet.get(pos)?;
        match len & 0xC0 {
            0x00 => {
                if name.len + 1 + usize::from(len) > MAX_WIRE_LEN {
                    return None;
                }
                let label = packet.get(pos..pos + 1 + usize::from(len))?;
                for (dst, &b) in name.buf[name.len..].iter_mut().zip(label) {
                    *dst = b.to_ascii_lowercase();
                }
                name.len += label.len();
                if len == 0 {
                    return Some((name, end.unwrap_or(pos + 1)));
                }
                pos += label.len();
            }
            0xC0 => {
                let target = usize::from(u16_at(packet, pos)? & 0x3FFF);
                hops += 1;
                if target >= limit || hops > MAX_POINTER_HOPS {
                    return None;
                }
                end.get_or_insert(pos + 2);
                limit = target;
                pos = target;
            }
            _ => return None,
        }
    }
}

/// The offset after the (possibly compressed) name at `at`, with the same checks as
/// [`read_name`] but nothing copied.
fn skip_name(packet: &[u8], at: usize) -> Option<usize> {
    let mut pos = at;
    let mut total = 0usize;
    loop {
        let len = *packet.get(pos)?;
        match len & 0xC0 {
            0x00 => {
                total += 1 + usize::from(len);
                if total > MAX_WIRE_LEN || pos + 1 + usize::from(len) > packet.len() {
                    return None;
                }
                if len == 0 {
                    return Some(pos + 1);
                }
                pos += 1 + usize::from(len);
            }
            // The pointer ends the name in the record; where it leads is checked when the
            // name is compared.
            0xC0 => return (pos + 1 < packet.len()).then_some(pos + 2),
            _ => return None,
        }
    }
}

/// Whether the (possibly compressed) name at `at` equals `target` (lowercased wire form),
/// ignoring case, without copying it. `None` when the name is malformed.
fn name_is(packet: &[u8], at: usize, target: &[u8]) -> Option<bool> {
    let mut pos = at;
    let mut limit = at;
    let mut hops = 0;
    let mut matched = 0usize;
    let mut equal = true;
    loop {
        let len = *packet.get(pos)?;
        match len & 0xC0 {
            0x00 => {
                let label = packet.get(pos..pos + 1 + usize::from(len))?;
                if matched + label.len() > MAX_WIRE_LEN {
                    return None;
                }
                equal = equal
                    && target
                        .get(matched..matched + label.len())
                        .is_some_and(|t| t.eq_ignore_ascii_case(label));
                matched += label.len();
                if len == 0 {
                    return Some(equal && matched == target.len());
                }
                pos += label.len();
            }
            0xC0 => {
                let ptr = usize::from(u16_at(packet, pos)? & 0x3FFF);
                hops += 1;
                if ptr >= limit || hops > MAX_POINTER_HOPS {
                    return None;
                }
                limit = ptr;
                pos = ptr;
            }
            _ => return None,
        }
    }
}

/// Most addresses [`collect_addresses`] keeps from one answer.
pub const MAX_ADDRESSES: usize = 32;
/// Most CNAME hops followed.
pub const MAX_CHAIN: usize = 16;
/// Most answer records looked at.
const MAX_RECORDS: usize = 64;

/// The addresses found on the CNAME chain of an answer's question.
#[derive(Debug, Clone, Copy)]
pub struct Addresses {
    ips: [IpAddr; MAX_ADDRESSES],
    count: usize,
    /// Minimum TTL over the chain's CNAME records and the address records, in seconds.
    pub min_ttl: u32,
    /// Maximum TTL as written over every record of the answer section, whatever its type or
    /// place (a TTL with the top bit set counts as written: huge), u32::MAX when the walk
    /// stopped before the last record: what [`clamp_ttls`] may have to lower.
    pub max_ttl: u32,
    /// CNAME hops followed.
    pub chain: usize,
    /// Address records of the answer section that were not on the chain (ignored).
    pub off_chain: usize,
    /// Addresses beyond [`MAX_ADDRESSES`] (ignored).
    pub overflow: usize,
}

impl Default for Addresses {
    fn default() -> Addresses {
        Addresses {
            ips: [IpAddr::V4(Ipv4Addr::UNSPECIFIED); MAX_ADDRESSES],
            count: 0,
            min_ttl: u32::MAX,
            max_ttl: 0,
            chain: 0,
            off_chain: 0,
            overflow: 0,
        }
    }
}

impl Addresses {
    fn reset(&mut self) {
        self.count = 0;
        self.min_ttl = u32::MAX;
        self.max_ttl = 0;
        self.chain = 0;
        self.off_chain = 0;
        self.overflow = 0;
    }

    /// The addresses, in answer order, without duplicates.
    pub fn ips(&self) -> &[IpAddr] {
        &self.ips[..self.count]
    }

    /// Adds an address (a duplicate is not added again; beyond the capacity it is counted in
    /// the overflow and dropped).
    pub fn push(&mut self, ip: IpAddr) {
        if self.ips().contains(&ip) {
            return;
        }
        if self.count == MAX_ADDRESSES {
            self.overflow += 1;
            return;
        }
        self.ips[self.count] = ip;
        self.count += 1;
    }
}

#[derive(Clone, Copy, Default)]
struct Record {
    owner_at: u16,
    rtype: u16,
    ttl: u32,
    rdata_at: u16,
    rdlen: u16,
}

/// Follows the CNAME chain from the question of `answer` through the answer section and
/// collects into `out` (reset first) the A and AAAA records owned by the chain's last name.
/// Records owned by other names — extra addresses an upstream (or an attacker) adds — are
/// counted and ignored. Nothing is allocated or copied but the addresses.
pub fn collect_addresses(
    packet: &[u8],
    answer: &Answer,
    out: &mut Addresses,
) -> Result<(), AnswerError> {
    out.reset();
    // Messages are at most 65535 bytes, so offsets fit 16 bits.
    if packet.len() > usize::from(u16::MAX) {
        return Err(AnswerError::BadRecord);
    }
    let mut records = [Record::default(); MAX_RECORDS];
    let mut count = 0;
    let mut pos = answer.question_end;
    for _ in 0..answer.answers {
        let after_owner = skip_name(packet, pos).ok_or(AnswerError::BadRecord)?;
        let rtype = u16_at(packet, after_owner).ok_or(AnswerError::BadRecord)?;
        let rclass = u16_at(packet, after_owner + 2).ok_or(AnswerError::BadRecord)?;
        let ttl = u32_at(packet, after_owner + 4).ok_or(AnswerError::BadRecord)?;
        let rdlen = usize::from(u16_at(packet, after_owner + 8).ok_or(AnswerError::BadRecord)?);
        let rdata_at = after_owner + 10;
        if rdata_at + rdlen > packet.len() {
            return Err(AnswerError::BadRecord);
        }
        out.max_ttl = out.max_ttl.max(ttl);
        if rclass == CLASS_IN && matches!(rtype, TYPE_A | TYPE_AAAA | TYPE_CNAME) {
            if count == MAX_RECORDS {
                out.max_ttl = u32::MAX;
                break;
            }
            // A TTL with the top bit set is treated as zero (RFC 2181 §8).
            let ttl = if ttl > i32::MAX as u32 { 0 } else { ttl };
            records[count] = Record {
                owner_at: pos as u16,
                rtype,
                ttl,
                rdata_at: rdata_at as u16,
                rdlen: rdlen as u16,
            };
            count += 1;
        }
        pos = rdata_at + rdlen;
    }
    let records = &records[..count];

    let mut target = FlatName {
        buf: [0; MAX_WIRE_LEN],
        len: answer.name_len,
    };
    target.buf[..answer.name_len].copy_from_slice(answer.name_wire(packet));
    target.buf[..answer.name_len].make_ascii_lowercase();
    let mut on_chain = [false; MAX_RECORDS];
    let mut chain_ttl = u32::MAX;
    let owned = |r: &Record, target: &FlatName| {
        name_is(packet, usize::from(r.owner_at), target.bytes()).ok_or(AnswerError::BadRecord)
    };
    loop {
        // A name with a CNAME has no other data (RFC 1034 §3.6.2): follow the alias, or else
        // collect the target's own addresses.
        let mut alias = None;
        for (i, r) in records.iter().enumerate() {
            if r.rtype == TYPE_CNAME && owned(r, &target)? {
                alias = Some(i);
                break;
            }
        }
        if let Some(i) = alias {
            let r = records[i];
            let (name, end) =
                read_name(packet, usize::from(r.rdata_at)).ok_or(AnswerError::BadRecord)?;
            // The alias must lie within its record's data.
            if end > usize::from(r.rdata_at) + usize::from(r.rdlen) {
                return Err(AnswerError::BadRecord);
            }
            if out.chain == MAX_CHAIN || name.bytes() == target.bytes() {
                break;
            }
            on_chain[i] = true;
            chain_ttl = chain_ttl.min(r.ttl);
            out.chain += 1;
            target = name;
            continue;
        }
        for (i, r) in records.iter().enumerate() {
            let at = usize::from(r.rdata_at);
            let ip = match (r.rtype, r.rdlen) {
                (TYPE_A, 4) => IpAddr::V4(Ipv4Addr::new(
                    packet[at],
                    packet[at + 1],
                    packet[at + 2],
                    packet[at + 3],
                )),
                (TYPE_AAAA, 16) => {
                    let mut b = [0u8; 16];
                    b.copy_from_slice(&packet[at..at + 16]);
                    IpAddr::V6(Ipv6Addr::from(b))
                }
                _ => continue,
            };
            if !owned(r, &target)? {
                continue;
            }
            out.push(ip);
            out.min_ttl = out.min_ttl.min(r.ttl);
            on_chain[i] = true;
        }
        break;
    }
    out.off_chain = records
        .iter()
        .zip(on_chain)
        .filter(|(r, on)| !on && matches!(r.rtype, TYPE_A | TYPE_AAAA))
        .count();
    if out.count > 0 {
        out.min_ttl = out.min_ttl.min(chain_ttl);
    } else {
        out.min_ttl = 0;
    }
    Ok(())
}

/// Lowers to `cap` every TTL of the answer section above it, and writes 0 over a TTL with
/// the top bit set (which means zero, RFC 2181 §8, but a client reading it as a plain u32
/// would cache it for ever). The answer's allow entries live 1.5 × at most `cap`, so a
/// client must not cache its records longer than `cap`. `answer` is the parse of `packet`;
/// a record that does not fit ends the walk (the packet was validated before). Returns
/// whether a TTL changed.
pub fn clamp_ttls(packet: &mut [u8], answer: &Answer, cap: u32) -> bool {
    let mut pos = answer.question_end;
    let mut changed = false;
    for _ in 0..answer.answers {
        let Some(after_owner) = skip_name(packet, pos) else {
            break;
        };
        let (Some(ttl), Some(rdlen)) = (
            u32_at(packet, after_owner + 4),
            u16_at(packet, after_owner + 8),
        ) else {
            break;
        };
        let new = if ttl > i32::MAX as u32 {
            0
        } else {
            ttl.min(cap)
        };
        if new != ttl {
            packet[after_owner + 4..after_owner + 8].copy_from_slice(&new.to_be_bytes());
            changed = true;
        }
        pos = after_owner + 10 + usize::from(rdlen);
    }
    changed
}

/// Copies the client's spelling of the question name over the answer's (same name, other
/// case: 0x20). `client_name` must equal the answer's question name case-insensitively.
pub fn restore_question_case(packet: &mut [u8], answer: &Answer, client_name: &[u8]) {
    debug_assert!(names_equal(answer.name_wire(packet), client_name));
    packet[HEADER_LEN..HEADER_LEN + answer.name_len].copy_from_slice(client_name);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &[u8], qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(name);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&CLASS_IN.to_be_bytes());
        q
    }

    #[test]
    fn parses_a_query() {
        let q = query(b"\x03WwW\x07example\x03com\x00", TYPE_A);
        let p = parse_query(&q).unwrap();
        assert_eq!(p.id, 0x1234);
        assert_eq!(p.qtype, TYPE_A);
        assert_eq!(p.name_wire(&q), b"\x03WwW\x07example\x03com\x00");
        assert_eq!(p.question_end, q.len());
        assert!(p.recursion_desired());
        assert_eq!(p.opt, None);
    }

    #[test]
    fn malformed_queries() {
        assert_eq!(parse_query(&[0; 11]), Err(QueryError::ShortHeader));
        let good = query(b"\x01a\x00", TYPE_A);
        let mut r = good.clone();
        r[2] |= 0x80;
        assert_eq!(parse_query(&r), Err(QueryError::ResponseBit));
        let mut r = good.clone();
        r[2] |= 0x10;
        assert_eq!(parse_query(&r), Err(QueryError::Opcode));
        let mut r = good.clone();
        r[5] = 2;
        assert_eq!(parse_query(&r), Err(QueryError::QuestionCount));
        r[5] = 0;
        assert_eq!(parse_query(&r), Err(QueryError::QuestionCount));
        assert_eq!(
            parse_query(&good[..good.len() - 1]),
            Err(QueryError::ShortQuestion)
        );
        assert_eq!(parse_query(&good[..13]), Err(QueryError::BadName));
        // Compression pointer in the question: a loop to itself and a forward pointer.
        let mut l = query(b"\xc0\x0c", TYPE_A);
        assert_eq!(parse_query(&l), Err(QueryError::BadName));
        l = query(b"\xc0\x20", TYPE_A);
        assert_eq!(parse_query(&l), Err(QueryError::BadName));
        // Reserved label type, label running off the end.
        assert_eq!(
            parse_query(&query(b"\x41a\x00", TYPE_A)),
            Err(QueryError::BadName)
        );
        assert_eq!(
            parse_query(&query(b"\x3fab\x00", TYPE_A)),
            Err(QueryError::BadName)
        );
        let mut long = Vec::new();
        for _ in 0..5 {
            long.push(63);
            long.extend_from_slice(&[b'a'; 63]);
        }
        long.push(0);
        assert_eq!(parse_query(&query(&long, TYPE_A)), Err(QueryError::BadName));
        let mut c = good.clone();
        let n = c.len();
        c[n - 1] = 9;
        assert_eq!(parse_query(&c), Err(QueryError::UnknownClass));
    }

    #[test]
    fn reply_in_place_keeps_id_question_and_opt() {
        let mut q = query(b"\x03Foo\x03com\x00", TYPE_AAAA);
        q[11] = 1; // ARCOUNT 1
        q.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0x80, 0x00, 0, 0]);
        let p = parse_query(&q).unwrap();
        assert!(p.opt.is_some());
        let edns = query_edns(&q, &p);
        assert_eq!(
            edns,
            Some(Edns {
                payload: 0x1000,
                dnssec_ok: true
            })
        );
        let mut buf = q.clone();
        let len = write_reply(&mut buf, &p, Rcode::Refused, true, edns);
        let r = &buf[..len];
        assert_eq!(r.len(), q.len());
        assert_eq!(&r[0..2], &[0x12, 0x34]);
        assert_eq!(r[3] & 0x0f, 5);
        assert_eq!(r[2] & 0x80, 0x80);
        assert_eq!(r[2] & 0x01, 0x01, "RD copied");
        assert_eq!(r[3] & 0x80, 0x80, "RA");
        assert_eq!(&r[12..p.question_end], &q[12..p.question_end]);
        assert_eq!(&r[10..12], &[0, 1]);
        // Without OPT: header + question only.
        let q = query(b"\x03foo\x00", TYPE_A);
        let p = parse_query(&q).unwrap();
        let mut buf = q.clone();
        assert_eq!(query_edns(&q, &p), None);
        assert_eq!(
            write_reply(&mut buf, &p, Rcode::NxDomain, false, None),
            q.len()
        );
        assert_eq!(buf[3], 3);
    }

    #[test]
    fn replies_carry_a_minimal_opt_without_the_clients_options() {
        // OPT with a client cookie (option 10, 8 bytes), version 1, payload 1232, DO clear.
        let mut q = query(b"\x03foo\x00", TYPE_A);
        q[11] = 1;
        q.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 1, 0, 0, 0, 12]);
        q.extend_from_slice(&[0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
        let p = parse_query(&q).unwrap();
        let edns = query_edns(&q, &p).unwrap();
        assert_eq!(edns.payload, 1232);
        assert!(!edns.dnssec_ok);
        let mut buf = q.clone();
        let len = write_reply(&mut buf, &p, Rcode::Refused, true, Some(edns));
        assert_eq!(len, p.question_end + OPT_LEN, "no option echoed");
        assert_eq!(
            &buf[p.question_end..len],
            &[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]
        );
        // An OPT that is not the lone additional record is found too, and dropped the same way.
        let mut q = query(b"\x03foo\x00", TYPE_A);
        q[11] = 2;
        q.extend_from_slice(b"\x01x\x00\x00\x10\x00\x01\x00\x00\x00\x00\x00\x01\x00");
        q.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0x80, 0, 0, 0]);
        let p = parse_query(&q).unwrap();
        assert_eq!(p.opt, None);
        let edns = query_edns(&q, &p).unwrap();
        assert!(edns.dnssec_ok);
        let mut out = vec![0; HEADER_LEN + 9 + OPT_LEN];
        let question = &q[HEADER_LEN..p.question_end];
        let len =
            write_reply_from_question(&mut out, 7, 0x0100, question, Rcode::ServFail, Some(edns));
        assert_eq!(len, out.len());
        assert_eq!(&out[10..12], &[0, 1]);
        assert_eq!(
            &out[len - OPT_LEN..],
            &[0, 0, 41, 0x10, 0, 0, 0, 0x80, 0, 0, 0]
        );
    }

    #[test]
    fn the_0x20_check_agrees_with_the_spelling() {
        let name = b"\x05Hello\x24averyveryverylongnamewithmanyletters\x1dmorethansixtyfourlettersinall\x04TEST\x00";
        for seed in [0u64, 1, 0xdead_beef, u64::MAX] {
            let mut spelled = name.to_vec();
            apply_0x20(&mut spelled, seed);
            assert!(names_equal(&spelled, name));
            assert!(is_0x20_spelling(&spelled, name, seed));
            assert!(is_0x20_spelling(&spelled, &name.to_ascii_lowercase(), seed));
            // Any other case of any letter, or another length, is not it.
            for i in [1, 40, 70, 75] {
                let mut other = spelled.clone();
                other[i] ^= 0x20;
                assert!(
                    !is_0x20_spelling(&other, name, seed),
                    "seed {seed} byte {i}"
                );
            }
            assert!(!is_0x20_spelling(&spelled[..10], &name[..11], seed));
            // Length bytes and non-letters are kept.
            assert_eq!(spelled[0], 5);
            assert_eq!(spelled[6], 0x24);
        }
        let mut a = name.to_vec();
        let mut b = name.to_vec();
        apply_0x20(&mut a, 1);
        apply_0x20(&mut b, 2);
        assert_ne!(a, b);
    }

    /// An answer whose A record's owner is a chain of `hops` pointers, each to the one
    /// before, the first to the question name (kept in the RDATA of a TXT record).
    fn pointer_chain_answer(hops: usize) -> Vec<u8> {
        let q = b"\x01a\x00";
        let mut p = answer_packet(q, &[]);
        p[7] = 2;
        let txt_at = p.len();
        p.extend_from_slice(b"\x01z\x00\x00\x10\x00\x01\x00\x00\x00\x05");
        p.extend_from_slice(&((2 * hops) as u16).to_be_bytes());
        let chain_at = txt_at + 13;
        for i in 0..hops {
            let target = if i == 0 {
                HEADER_LEN
            } else {
                chain_at + 2 * (i - 1)
            };
            p.extend_from_slice(&(0xc000 | target as u16).to_be_bytes());
        }
        p.extend_from_slice(&(0xc000 | (chain_at + 2 * (hops - 1)) as u16).to_be_bytes());
        p.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 192, 0, 2, 9]);
        p
    }

    #[test]
    fn pointer_chains_are_bounded_in_hops() {
        // 100 chained pointers plus the owner's own: followed, the address collected.
        let p = pointer_chain_answer(100);
        let a = parse_answer(&p).unwrap();
        let mut addrs = Addresses::default();
        collect_addresses(&p, &a, &mut addrs).unwrap();
        assert_eq!(addrs.ips(), &["192.0.2.9".parse::<IpAddr>().unwrap()]);
        // 200 (each strictly backwards, so no loop): refused, not walked to the end.
        let p = pointer_chain_answer(200);
        let a = parse_answer(&p).unwrap();
        assert_eq!(
            collect_addresses(&p, &a, &mut Addresses::default()).unwrap_err(),
            AnswerError::BadRecord
        );
        assert!(read_name(&p, p.len() - 16).is_none());
        assert!(read_name(&pointer_chain_answer(100), 12 + 7 + 13 + 200).is_some());
    }

    fn answer_packet(question: &[u8], records: &[(&[u8], u16, u32, &[u8])]) -> Vec<u8> {
        let mut p = vec![
            0xab,
            0xcd,
            0x81,
            0x80,
            0,
            1,
            0,
            records.len() as u8,
            0,
            0,
            0,
            0,
        ];
        p.extend_from_slice(question);
        p.extend_from_slice(&[0, 1, 0, 1]);
        for (owner, rtype, ttl, rdata) in records {
            p.extend_from_slice(owner);
            p.extend_from_slice(&rtype.to_be_bytes());
            p.extend_from_slice(&CLASS_IN.to_be_bytes());
            p.extend_from_slice(&ttl.to_be_bytes());
            p.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            p.extend_from_slice(rdata);
        }
        p
    }

    #[test]
    fn follows_the_cname_chain_only() {
        let q = b"\x03WWW\x01x\x00";
        let p = answer_packet(
            q,
            &[
                (b"\xc0\x0c", TYPE_CNAME, 300, b"\x01b\x01y\x00"),
                // Off-chain address: must be ignored.
                (b"\x04evil\x00", TYPE_A, 9999, &[6, 6, 6, 6]),
                (b"\x01B\x01Y\x00", TYPE_A, 60, &[192, 0, 2, 1]),
                (
                    b"\x01b\x01y\x00",
                    TYPE_AAAA,
                    120,
                    &[0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                ),
                (b"\x01b\x01y\x00", TYPE_A, 60, &[192, 0, 2, 1]),
            ],
        );
        let a = parse_answer(&p).unwrap();
        let mut addrs = Addresses::default();
        collect_addresses(&p, &a, &mut addrs).unwrap();
        assert_eq!(addrs.ips().len(), 2);
        assert_eq!(addrs.ips()[0], "192.0.2.1".parse::<IpAddr>().unwrap());
        assert_eq!(addrs.min_ttl, 60);
        // Every record's, the off-chain one's 9999 too (the clamp lowers them all).
        assert_eq!(addrs.max_ttl, 9999);
        assert_eq!(addrs.chain, 1);
        assert_eq!(addrs.off_chain, 1);
    }

    #[test]
    fn ttls_above_the_cap_are_lowered_in_the_answer_section() {
        let q = b"\x01a\x00";
        let mut p = answer_packet(
            q,
            &[
                (b"\xc0\x0c", TYPE_CNAME, 604_800, b"\x01b\x00"),
                (b"\x01b\x00", TYPE_A, 90_000, &[192, 0, 2, 1]),
                (b"\x01b\x00", TYPE_A, 60, &[192, 0, 2, 2]),
                (b"\x01b\x00", TYPE_A, 0x8000_0000, &[192, 0, 2, 3]),
            ],
        );
        let a = parse_answer(&p).unwrap();
        assert!(clamp_ttls(&mut p, &a, 86_400));
        assert!(!clamp_ttls(&mut p, &a, 86_400), "nothing left to lower");
        let a = parse_answer(&p).unwrap();
        let mut addrs = Addresses::default();
        collect_addresses(&p, &a, &mut addrs).unwrap();
        assert_eq!(addrs.ips().len(), 3);
        // TTL fields: owner, type and class before each; records of 15, 17 and 17 bytes.
        let qe = a.question_end;
        let ttls: Vec<u32> = [qe + 6, qe + 15 + 7, qe + 32 + 7]
            .iter()
            .map(|&at| u32_at(&p, at).unwrap())
            .collect();
        assert_eq!(ttls, [86_400, 86_400, 60]);
        let tail = &p[p.len() - 4 - 2 - 4..p.len() - 4 - 2];
        assert_eq!(
            tail,
            0u32.to_be_bytes(),
            "top bit set: written as the zero it means"
        );
        assert_eq!(
            addrs.min_ttl, 0,
            "a TTL with the top bit set still means zero"
        );
    }

    #[test]
    fn cname_loops_and_bad_pointers_end_cleanly() {
        let q = b"\x01a\x00";
        let p = answer_packet(
            q,
            &[
                (b"\x01a\x00", TYPE_CNAME, 5, b"\x01b\x00"),
                (b"\x01b\x00", TYPE_CNAME, 5, b"\x01a\x00"),
            ],
        );
        let a = parse_answer(&p).unwrap();
        let mut addrs = Addresses::default();
        collect_addresses(&p, &a, &mut addrs).unwrap();
        assert_eq!(addrs.ips().len(), 0);
        assert!(addrs.chain <= MAX_CHAIN);
        // A pointer to itself in an owner name.
        let mut p = answer_packet(q, &[(b"\xc0\x00", TYPE_A, 5, &[1, 2, 3, 4])]);
        let at = HEADER_LEN + q.len() + 4;
        p[at + 1] = at as u8;
        let a = parse_answer(&p).unwrap();
        assert_eq!(
            collect_addresses(&p, &a, &mut Addresses::default()).unwrap_err(),
            AnswerError::BadRecord
        );
        // Truncated rdata.
        let p = answer_packet(q, &[(b"\x01a\x00", TYPE_A, 5, &[1, 2, 3, 4])]);
        let a = parse_answer(&p[..p.len() - 1]).unwrap();
        assert_eq!(
            collect_addresses(&p[..p.len() - 1], &a, &mut Addresses::default()).unwrap_err(),
            AnswerError::BadRecord
        );
    }
}
