//! The upstream's answers, sans-IO: query bytes in, reply bytes out (built in place from the
//! query: header and question copied as received, answers appended with compression
//! pointers). No allocation, no clock, no socket.
//!
//! Name-driven behaviours, chosen by the first label of the query name (case-insensitive):
//!
//! | first label      | reply |
//! |------------------|-------|
//! | `nxdomain-*`     | NXDOMAIN |
//! | `servfail-*`     | SERVFAIL |
//! | `refused-*`      | REFUSED |
//! | `drop-*`         | no reply at all |
//! | `tc-*`           | UDP: TC bit set, no answers; TCP: the full answer |
//! | `cname-N-REST`   | a chain of N CNAMEs (`cname-N-REST` → `cname-(N-1)-REST` → … → `cname-0-REST`, same suffix), then the A/AAAA records of `cname-0-REST` (N ≤ 16) |
//! | `extra-*`        | the answer plus an A record for an unrelated owner (`poison.dnsfence.invalid.`) in the answer section and another (`glue.dnsfence.invalid.`) in the additional section |
//! | `delay-N-*`      | the answer, sent N milliseconds late (N ≤ 60000) |
//!
//! Any other name gets `--ips` A or AAAA records whose addresses are derived from a hash of
//! the lowercased name, inside the configured prefixes; other types get an empty NOERROR.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::wire::{self, HEADER_LEN};

/// The most CNAMEs in a `cname-N-*` chain.
pub const MAX_CHAIN: u32 = 16;
/// The most addresses per answer (`--ips`).
pub const MAX_IPS: u16 = 64;
/// Owner name of the unrelated record in `extra-*` answers (answer section).
pub const POISON_OWNER: &str = "poison.dnsfence.invalid.";
/// Owner name of the unrelated record in `extra-*` answers (additional section).
pub const GLUE_OWNER: &str = "glue.dnsfence.invalid.";

/// An address prefix (`198.18.0.0/15`, `fd00::/8`) from which answers are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix<A> {
    /// The network address.
    pub addr: A,
    /// Prefix length in bits.
    pub len: u8,
}

impl std::str::FromStr for Prefix<Ipv4Addr> {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = s.split_once('/').ok_or("expected ADDR/LEN")?;
        let addr: Ipv4Addr = a.parse().map_err(|e| format!("{a}: {e}"))?;
        let len: u8 = l.parse().map_err(|e| format!("{l}: {e}"))?;
        if len > 32 {
            return Err(format!("prefix length {len} > 32"));
        }
        Ok(Self { addr, len })
    }
}

impl std::str::FromStr for Prefix<Ipv6Addr> {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = s.split_once('/').ok_or("expected ADDR/LEN")?;
        let addr: Ipv6Addr = a.parse().map_err(|e| format!("{a}: {e}"))?;
        let len: u8 = l.parse().map_err(|e| format!("{l}: {e}"))?;
        if len > 128 {
            return Err(format!("prefix length {len} > 128"));
        }
        Ok(Self { addr, len })
    }
}

/// The transport a query came over (TC replies only happen over UDP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// UDP: replies are limited to 512 bytes, or the EDNS0 size (at most 4096).
    Udp,
    /// TCP: no size limit below 65535, never truncated.
    Tcp,
}

/// What the responder did with one query; also the index of its counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// NOERROR with answers (or empty for other types).
    Answer,
    /// NXDOMAIN (`nxdomain-*`).
    NxDomain,
    /// SERVFAIL (`servfail-*`).
    ServFail,
    /// REFUSED (`refused-*`, or a class other than IN).
    Refused,
    /// A truncated reply (`tc-*` over UDP, or an answer too large for UDP).
    Truncated,
    /// FORMERR: the query was malformed but had a header to answer.
    FormErr,
    /// NOTIMP: an opcode other than QUERY.
    NotImp,
    /// No reply: `drop-*`.
    DropByName,
    /// No reply: shorter than a header, or a response rather than a query.
    Malformed,
}

impl Outcome {
    /// Every outcome, in counter order.
    pub const ALL: [Outcome; 9] = [
        Outcome::Answer,
        Outcome::NxDomain,
        Outcome::ServFail,
        Outcome::Refused,
        Outcome::Truncated,
        Outcome::FormErr,
        Outcome::NotImp,
        Outcome::DropByName,
        Outcome::Malformed,
    ];

    /// A short name for statistics.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Answer => "answer",
            Outcome::NxDomain => "nxdomain",
            Outcome::ServFail => "servfail",
            Outcome::Refused => "refused",
            Outcome::Truncated => "truncated",
            Outcome::FormErr => "formerr",
            Outcome::NotImp => "notimp",
            Outcome::DropByName => "drop_by_name",
            Outcome::Malformed => "malformed",
        }
    }
}

/// The reply to one query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// Bytes of the reply written to the output buffer; 0: send nothing.
    pub len: usize,
    /// What kind of reply it is.
    pub outcome: Outcome,
    /// Milliseconds to hold the reply back (`delay-N-*`), on top of any global delay.
    pub delay_ms: u32,
}

/// Answer settings.
#[derive(Debug, Clone, Copy)]
pub struct Responder {
    /// TTL of every record.
    pub ttl: u32,
    /// Addresses per A/AAAA answer.
    pub ips: u16,
    /// Prefix of A answers.
    pub prefix4: Prefix<Ipv4Addr>,
    /// Prefix of AAAA answers.
    pub prefix6: Prefix<Ipv6Addr>,
}

impl Default for Responder {
    fn default() -> Self {
        Self {
            ttl: 300,
            ips: 1,
            prefix4: Prefix {
                addr: Ipv4Addr::new(127, 0, 0, 0),
                len: 8,
            },
            prefix6: Prefix {
                addr: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0),
                len: 8,
            },
        }
    }
}

/// The output buffer ran out of room.
struct Full;

struct Writer<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), Full> {
        let dst = self
            .buf
            .get_mut(self.len..self.len + bytes.len())
            .ok_or(Full)?;
        dst.copy_from_slice(bytes);
        self.len += bytes.len();
        Ok(())
    }

    fn put_u16(&mut self, v: u16) -> Result<(), Full> {
        self.put(&v.to_be_bytes())
    }

    fn put_u32(&mut self, v: u32) -> Result<(), Full> {
        self.put(&v.to_be_bytes())
    }

    fn set_u16(&mut self, at: usize, v: u16) {
        self.buf[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }
}

/// The parsed parts of a query that the reply needs.
struct Query<'q> {
    msg: &'q [u8],
    question_end: usize,
    qtype: u16,
    qclass: u16,
    /// EDNS0: the requester's UDP payload size and DO bit.
    edns: Option<(u16, bool)>,
    /// The query name, lowercased, in wire format.
    lower: [u8; 255],
    lower_len: usize,
}

impl Query<'_> {
    fn first_label(&self) -> &[u8] {
        let len = self.lower[0] as usize;
        &self.lower[1..1 + len]
    }
}

enum Special {
    None,
    Rcode(u8, Outcome),
    Drop,
    Truncate,
    Chain(u32),
    Extra,
}

const FLAG_QR: u16 = 0x8000;
const FLAG_AA: u16 = 0x0400;
const FLAG_TC: u16 = 0x0200;
const FLAG_RD: u16 = 0x0100;
const FLAG_RA: u16 = 0x0080;
const FLAG_CD: u16 = 0x0010;

/// A leading `PREFIX-DIGITS-` of `label`: the number, and the rest after the second dash.
fn numbered<'l>(label: &'l [u8], prefix: &[u8]) -> Option<(u32, &'l [u8])> {
    let rest = label.strip_prefix(prefix)?;
    let dash = rest.iter().position(|&b| b == b'-')?;
    let digits = &rest[..dash];
    if digits.is_empty() || digits.len() > 5 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u32, |n, d| n * 10 + u32::from(d - b'0'));
    Some((n, &rest[dash + 1..]))
}

impl Responder {
    /// Builds the reply to `query` into `out` (at least 512 bytes for UDP; 65535 is always
    /// enough). Never panics, whatever the bytes.
    pub fn respond(&self, query: &[u8], transport: Transport, out: &mut [u8]) -> Reply {
        let reply = |len, outcome| Reply {
            len,
            outcome,
            delay_ms: 0,
        };
        if query.len() < HEADER_LEN {
            return reply(0, Outcome::Malformed);
        }
        let flags = u16::from_be_bytes([query[2], query[3]]);
        if flags & FLAG_QR != 0 {
            return reply(0, Outcome::Malformed);
        }
        let opcode = (flags >> 11) & 0xF;
        if opcode != 0 {
            return reply(
                self.header_only(query, wire::RCODE_NOTIMP, out),
                Outcome::NotImp,
            );
        }
        let Some(q) = parse_query(query) else {
            return reply(
                self.header_only(query, wire::RCODE_FORMERR, out),
                Outcome::FormErr,
            );
        };
        if q.qclass != wire::CLASS_IN {
            return reply(
                self.empty(&q, wire::RCODE_REFUSED, false, out),
                Outcome::Refused,
            );
        }
        let mut label = q.first_label();
        let mut delay_ms = 0;
        if let Some((ms, rest)) = numbered(label, b"delay-") {
            delay_ms = ms.min(60_000);
            label = rest;
        }
        let special = if label.starts_with(b"nxdomain-") {
            Special::Rcode(wire::RCODE_NXDOMAIN, Outcome::NxDomain)
        } else if label.starts_with(b"servfail-") {
            Special::Rcode(wire::RCODE_SERVFAIL, Outcome::ServFail)
        } else if label.starts_with(b"refused-") {
            Special::Rcode(wire::RCODE_REFUSED, Outcome::Refused)
        } else if label.starts_with(b"drop-") {
            Special::Drop
        } else if label.starts_with(b"tc-") && transport == Transport::Udp {
            Special::Truncate
        } else if let Some((n, _)) = numbered(label, b"cname-") {
            Special::Chain(n.min(MAX_CHAIN))
        } else if label.starts_with(b"extra-") {
            Special::Extra
        } else {
            Special::None
        };
        let (len, outcome) = match special {
            Special::Drop => (0, Outcome::DropByName),
            Special::Rcode(rcode, outcome) => (self.empty(&q, rcode, false, out), outcome),
            Special::Truncate => (
                self.empty(&q, wire::RCODE_NOERROR, true, out),
                Outcome::Truncated,
            ),
            Special::None | Special::Chain(_) | Special::Extra => {
                let chain = match special {
                    Special::Chain(n) => n,
                    _ => 0,
                };
                let limit = match (transport, q.edns) {
                    (Transport::Tcp, _) => usize::from(u16::MAX),
                    (Transport::Udp, None) => 512,
                    (Transport::Udp, Some((size, _))) => usize::from(size).clamp(512, 4096),
                };
                let limit = limit.min(out.len());
                let extra = matches!(special, Special::Extra);
                match self.full(&q, chain, extra, &mut out[..limit]) {
                    Ok(len) => (len, Outcome::Answer),
                    Err(Full) => (
                        self.empty(&q, wire::RCODE_NOERROR, true, out),
                        Outcome::Truncated,
                    ),
                }
            }
        };
        Reply {
            len,
            outcome,
            delay_ms,
        }
    }

    /// A reply of just a header (no question): for queries whose question cannot be parsed.
    fn header_only(&self, query: &[u8], rcode: u8, out: &mut [u8]) -> usize {
        if out.len() < HEADER_LEN {
            return 0;
        }
        let flags = u16::from_be_bytes([query[2], query[3]]);
        let flags = FLAG_QR | (flags & (0x7800 | FLAG_RD)) | u16::from(rcode);
        out[..2].copy_from_slice(&query[..2]);
        out[2..4].copy_from_slice(&flags.to_be_bytes());
        out[4..HEADER_LEN].fill(0);
        HEADER_LEN
    }

    fn header_and_question(
        &self,
        q: &Query<'_>,
        rcode: u8,
        tc: bool,
        w: &mut Writer<'_>,
    ) -> Result<(), Full> {
        let qflags = u16::from_be_bytes([q.msg[2], q.msg[3]]);
        let mut flags = FLAG_QR | FLAG_AA | FLAG_RA | (qflags & (FLAG_RD | FLAG_CD));
        if tc {
            flags |= FLAG_TC;
        }
        flags |= u16::from(rcode);
        w.put(&q.msg[..2])?;
        w.put_u16(flags)?;
        w.put(&[0, 1, 0, 0, 0, 0, 0, 0])?;
        w.put(&q.msg[HEADER_LEN..q.question_end])
    }

    fn put_opt(&self, q: &Query<'_>, w: &mut Writer<'_>) -> Result<u16, Full> {
        let Some((_, dnssec_ok)) = q.edns else {
            return Ok(0);
        };
        w.put(&[0])?;
        w.put_u16(wire::TYPE_OPT)?;
        w.put_u16(1232)?;
        w.put_u32(if dnssec_ok { 0x8000 } else { 0 })?;
        w.put_u16(0)?;
        Ok(1)
    }

    /// Header, question and OPT only (rcode replies, TC replies, NODATA).
    fn empty(&self, q: &Query<'_>, rcode: u8, tc: bool, out: &mut [u8]) -> usize {
        let mut w = Writer { buf: out, len: 0 };
        let result = self
            .header_and_question(q, rcode, tc, &mut w)
            .and_then(|()| {
                let ar = self.put_opt(q, &mut w)?;
                w.set_u16(10, ar);
                Ok(())
            });
        match result {
            Ok(()) => w.len,
            Err(Full) => 0,
        }
    }

    fn full(&self, q: &Query<'_>, chain: u32, extra: bool, out: &mut [u8]) -> Result<usize, Full> {
        let mut w = Writer { buf: out, len: 0 };
        self.header_and_question(q, wire::RCODE_NOERROR, false, &mut w)?;
        let mut ancount: u16 = 0;
        // Owner of the next record: a pointer to the question name, then to each CNAME target.
        let mut owner = HEADER_LEN as u16;
        // The final owner's lowercased wire name, for the address hash.
        let mut final_name = [0u8; 255];
        let mut final_len = q.lower_len;
        final_name[..final_len].copy_from_slice(&q.lower[..q.lower_len]);
        if chain > 0 {
            let label = q.first_label();
            let (delay, rest) = match numbered(label, b"delay-") {
                Some((_, rest)) => (&label[..label.len() - rest.len()], rest),
                None => (&label[..0], label),
            };
            // `rest` is `cname-N-TAIL`, validated by the caller.
            let tail_at = 6 + rest[6..].iter().position(|&b| b == b'-').unwrap_or(0) + 1;
            let tail_orig =
                &q.msg[HEADER_LEN + 1 + delay.len() + tail_at..HEADER_LEN + 1 + label.len()];
            // The rest of the name after the first label, as received.
            let suffix = (HEADER_LEN + 1 + label.len()) as u16;
            for k in (0..chain).rev() {
                let mut digits = [0u8; 10];
                let digits = format_u32(k, &mut digits);
                let label_len = 6 + digits.len() + 1 + tail_orig.len();
                if label_len > 63 {
                    return Err(Full);
                }
                w.put_u16(0xC000 | owner)?;
                w.put_u16(wire::TYPE_CNAME)?;
                w.put_u16(wire::CLASS_IN)?;
                w.put_u32(self.ttl)?;
                w.put_u16(label_len as u16 + 1 + 2)?;
                let target = w.len;
                if target > 0x3FFF {
                    return Err(Full);
                }
                w.put(&[label_len as u8])?;
                w.put(b"cname-")?;
                w.put(digits)?;
                w.put(b"-")?;
                w.put(tail_orig)?;
                w.put_u16(0xC000 | suffix)?;
                owner = target as u16;
                ancount += 1;
                // final_name = lowercase(target label) + the lowercased suffix.
                let suffix_lower = &q.lower[1 + label.len()..q.lower_len];
                let mut f = Writer {
                    buf: &mut final_name,
                    len: 0,
                };
                f.put(&[label_len as u8])?;
                f.put(b"cname-")?;
                f.put(digits)?;
                f.put(b"-")?;
                f.put(&q.lower[1 + delay.len() + tail_at..1 + label.len()])?;
                f.put(suffix_lower)?;
                final_len = f.len;
            }
        }
        let final_name = &final_name[..final_len];
        match q.qtype {
            wire::TYPE_A => {
                for i in 0..self.ips {
                    w.put_u16(0xC000 | owner)?;
                    w.put_u16(wire::TYPE_A)?;
                    w.put_u16(wire::CLASS_IN)?;
                    w.put_u32(self.ttl)?;
                    w.put_u16(4)?;
                    w.put(&self.v4(final_name, i).octets())?;
                    ancount += 1;
                }
            }
            wire::TYPE_AAAA => {
                for i in 0..self.ips {
                    w.put_u16(0xC000 | owner)?;
                    w.put_u16(wire::TYPE_AAAA)?;
                    w.put_u16(wire::CLASS_IN)?;
                    w.put_u32(self.ttl)?;
                    w.put_u16(16)?;
                    w.put(&self.v6(final_name, i).octets())?;
                    ancount += 1;
                }
            }
            _ => {}
        }
        let mut arcount = 0;
        if extra {
            ancount += self.put_unrelated(POISON_OWNER, &mut w)?;
            arcount += self.put_unrelated(GLUE_OWNER, &mut w)?;
        }
        arcount += self.put_opt(q, &mut w)?;
        w.set_u16(6, ancount);
        w.set_u16(10, arcount);
        Ok(w.len)
    }

    fn put_unrelated(&self, owner: &str, w: &mut Writer<'_>) -> Result<u16, Full> {
        let mut name = [0u8; 64];
        let mut n = 0;
        for label in owner.trim_end_matches('.').split('.') {
            name[n] = label.len() as u8;
            name[n + 1..n + 1 + label.len()].copy_from_slice(label.as_bytes());
            n += 1 + label.len();
        }
        name[n] = 0;
        let name = &name[..n + 1];
        w.put(name)?;
        w.put_u16(wire::TYPE_A)?;
        w.put_u16(wire::CLASS_IN)?;
        w.put_u32(self.ttl)?;
        w.put_u16(4)?;
        w.put(&self.v4(name, 0).octets())?;
        Ok(1)
    }

    /// The `index`-th IPv4 answer for a lowercased wire-format name.
    pub fn v4(&self, lower_name: &[u8], index: u16) -> Ipv4Addr {
        let h = name_hash(lower_name, u64::from(index) << 1);
        let net = u32::from(self.prefix4.addr);
        let mask = if self.prefix4.len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix4.len))
        };
        Ipv4Addr::from((net & mask) | (h as u32 & !mask))
    }

    /// The `index`-th IPv6 answer for a lowercased wire-format name.
    pub fn v6(&self, lower_name: &[u8], index: u16) -> Ipv6Addr {
        let h1 = name_hash(lower_name, (u64::from(index) << 1) | 1);
        let h2 = splitmix(h1);
        let h = (u128::from(h1) << 64) | u128::from(h2);
        let net = u128::from(self.prefix6.addr);
        let mask = if self.prefix6.len == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(self.prefix6.len))
        };
        Ipv6Addr::from((net & mask) | (h & !mask))
    }

    /// The addresses the upstream answers for `name` (presentation format, any case):
    /// for tests and tools that need to know them.
    pub fn addresses(&self, name: &str) -> (Vec<Ipv4Addr>, Vec<Ipv6Addr>) {
        let mut wire_name = Vec::new();
        if wire::encode_name(&name.to_ascii_lowercase(), &mut wire_name).is_err() {
            return (Vec::new(), Vec::new());
        }
        (
            (0..self.ips).map(|i| self.v4(&wire_name, i)).collect(),
            (0..self.ips).map(|i| self.v6(&wire_name, i)).collect(),
        )
    }
}

fn format_u32(mut v: u32, buf: &mut [u8; 10]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            return &buf[i..];
        }
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a of the name, finalised with splitmix64 and a salt.
fn name_hash(name: &[u8], salt: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in name {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    splitmix(h ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

fn parse_query(msg: &[u8]) -> Option<Query<'_>> {
    if wire::u16_at(msg, 4)? != 1 {
        return None;
    }
    let name_end = wire::name_end(msg, HEADER_LEN)?;
    let question_end = name_end + 4;
    if question_end > msg.len() {
        return None;
    }
    let qtype = u16::from_be_bytes([msg[name_end], msg[name_end + 1]]);
    let qclass = u16::from_be_bytes([msg[name_end + 2], msg[name_end + 3]]);
    let mut lower = [0u8; 255];
    let lower_len = name_end - HEADER_LEN;
    lower[..lower_len].copy_from_slice(&msg[HEADER_LEN..name_end]);
    lower[..lower_len].make_ascii_lowercase();
    let edns = find_opt(msg, question_end)?;
    Some(Query {
        msg,
        question_end,
        qtype,
        qclass,
        edns,
        lower,
        lower_len,
    })
}

/// The EDNS0 OPT of a query (payload size, DO), when it has one; `None` (outer) when the
/// records after the question are malformed.
#[allow(clippy::option_option)]
fn find_opt(msg: &[u8], mut pos: usize) -> Option<Option<(u16, bool)>> {
    let an = wire::u16_at(msg, 6)?;
    let ns = wire::u16_at(msg, 8)?;
    let ar = wire::u16_at(msg, 10)?;
    let mut found = None;
    for i in 0..u32::from(an) + u32::from(ns) + u32::from(ar) {
        pos = wire::skip_name(msg, pos)?;
        let fixed = msg.get(pos..pos + 10)?;
        let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        let class = u16::from_be_bytes([fixed[2], fixed[3]]);
        let ttl = u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]);
        let rdlen = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        pos += 10 + rdlen;
        if pos > msg.len() {
            return None;
        }
        if rtype == wire::TYPE_OPT && i >= u32::from(an) + u32::from(ns) {
            found = Some((class, ttl & 0x8000 != 0));
        }
    }
    Some(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queries::{EncodeOptions, QuerySet};

    fn query(name: &str, qtype: &str, edns: bool) -> Vec<u8> {
        let options = EncodeOptions {
            edns_udp_size: edns.then_some(1232),
            ..EncodeOptions::default()
        };
        let set = QuerySet::parse(&format!("{name} {qtype}"), options).unwrap();
        let mut q = set.message(0).to_vec();
        q[..2].copy_from_slice(&[0xAB, 0xCD]);
        q
    }

    fn run(name: &str, qtype: &str, transport: Transport) -> (Vec<u8>, Reply) {
        let mut out = vec![0u8; 65535];
        let r = Responder::default().respond(&query(name, qtype, false), transport, &mut out);
        out.truncate(r.len);
        (out, r)
    }

    #[test]
    fn answers_a_with_hash_addresses() {
        let (out, r) = run("www.Example.com", "A", Transport::Udp);
        assert_eq!(r.outcome, Outcome::Answer);
        assert_eq!(&out[..2], &[0xAB, 0xCD]);
        assert_eq!(out[2] & 0x80, 0x80);
        assert_eq!(wire::u16_at(&out, 6), Some(1));
        // Question copied as received (case kept).
        assert_eq!(&out[12..29], b"\x03www\x07Example\x03com\x00");
        let (v4, _) = Responder::default().addresses("WWW.example.COM.");
        assert_eq!(&out[out.len() - 4..], &v4[0].octets());
        assert_eq!(v4[0].octets()[0], 127);
    }

    #[test]
    fn special_names() {
        for (name, outcome, rcode) in [
            ("nxdomain-x.test", Outcome::NxDomain, 3),
            ("ServFail-x.test", Outcome::ServFail, 2),
            ("refused-x.test", Outcome::Refused, 5),
            ("tc-x.test", Outcome::Truncated, 0),
        ] {
            let (out, r) = run(name, "A", Transport::Udp);
            assert_eq!(r.outcome, outcome, "{name}");
            assert_eq!(out[3] & 0xF, rcode, "{name}");
            assert_eq!(wire::u16_at(&out, 6), Some(0), "{name}");
        }
        let (out, r) = run("tc-x.test", "A", Transport::Tcp);
        assert_eq!(r.outcome, Outcome::Answer);
        assert_eq!(wire::u16_at(&out, 6), Some(1));
        let (_, r) = run("drop-x.test", "A", Transport::Udp);
        assert_eq!((r.len, r.outcome), (0, Outcome::DropByName));
        let (_, r) = run("delay-250-x.test", "A", Transport::Udp);
        assert_eq!((r.outcome, r.delay_ms), (Outcome::Answer, 250));
    }

    #[test]
    fn malformed_input_never_panics() {
        let r = Responder::default();
        let mut out = vec![0u8; 512];
        let base = query("cname-3-a.b.c", "AAAA", true);
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let mut q = base.clone();
            q.truncate(rng.usize(..=q.len()));
            for _ in 0..rng.usize(0..4) {
                if !q.is_empty() {
                    let i = rng.usize(..q.len());
                    q[i] = rng.u8(..);
                }
            }
            let reply = r.respond(&q, Transport::Udp, &mut out);
            assert!(reply.len <= out.len());
        }
        assert_eq!(
            r.respond(&[1, 2, 3], Transport::Udp, &mut out).outcome,
            Outcome::Malformed
        );
        let mut q = query("a.b", "A", false);
        q[5] = 2;
        assert_eq!(
            r.respond(&q, Transport::Udp, &mut out).outcome,
            Outcome::FormErr
        );
    }

    #[test]
    fn large_answers_truncate_over_udp_only() {
        let r = Responder {
            ips: MAX_IPS,
            ..Responder::default()
        };
        let mut out = vec![0u8; 65535];
        let q = query("big.example", "AAAA", false);
        assert_eq!(
            r.respond(&q, Transport::Udp, &mut out).outcome,
            Outcome::Truncated
        );
        assert_eq!(out[2] & 0x02, 0x02);
        assert_eq!(
            r.respond(&q, Transport::Tcp, &mut out).outcome,
            Outcome::Answer
        );
    }

    #[test]
    fn prefixes_hold() {
        let r = Responder {
            prefix4: "198.18.0.0/15".parse().unwrap(),
            prefix6: "2001:db8::/32".parse().unwrap(),
            ips: 8,
            ..Responder::default()
        };
        let (v4, v6) = r.addresses("a.example");
        assert_eq!(v4.len(), 8);
        for a in v4 {
            assert_eq!(
                u32::from(a) >> 17,
                u32::from(Ipv4Addr::new(198, 18, 0, 0)) >> 17
            );
        }
        for a in v6 {
            assert_eq!(a.segments()[..2], [0x2001, 0xdb8]);
        }
        assert!("1.2.3.4/33".parse::<Prefix<Ipv4Addr>>().is_err());
    }
}
