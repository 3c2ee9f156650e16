//! The little of the DNS wire format that the hot paths need, without allocation:
//! header fields, uncompressed question names, type mnemonics, rcode names.

/// Length of the DNS header.
pub const HEADER_LEN: usize = 12;
/// Type A.
pub const TYPE_A: u16 = 1;
/// Type CNAME.
pub const TYPE_CNAME: u16 = 5;
/// Type AAAA.
pub const TYPE_AAAA: u16 = 28;
/// Type OPT (EDNS0 pseudo-record).
pub const TYPE_OPT: u16 = 41;
/// Class IN.
pub const CLASS_IN: u16 = 1;

/// Rcode NOERROR.
pub const RCODE_NOERROR: u8 = 0;
/// Rcode FORMERR.
pub const RCODE_FORMERR: u8 = 1;
/// Rcode SERVFAIL.
pub const RCODE_SERVFAIL: u8 = 2;
/// Rcode NXDOMAIN.
pub const RCODE_NXDOMAIN: u8 = 3;
/// Rcode NOTIMP.
pub const RCODE_NOTIMP: u8 = 4;
/// Rcode REFUSED.
pub const RCODE_REFUSED: u8 = 5;

const TYPES: &[(&str, u16)] = &[
    ("A", 1),
    ("NS", 2),
    ("CNAME", 5),
    ("SOA", 6),
    ("PTR", 12),
    ("HINFO", 13),
    ("MX", 15),
    ("TXT", 16),
    ("AAAA", 28),
    ("SRV", 33),
    ("NAPTR", 35),
    ("DS", 43),
    ("RRSIG", 46),
    ("NSEC", 47),
    ("DNSKEY", 48),
    ("TLSA", 52),
    ("SVCB", 64),
    ("HTTPS", 65),
    ("CAA", 257),
    ("ANY", 255),
];

/// A type mnemonic (`AAAA`, any case) or `TYPEnnn` to its number.
pub fn parse_type(text: &str) -> Option<u16> {
    if let Some((_, t)) = TYPES.iter().find(|(n, _)| n.eq_ignore_ascii_case(text)) {
        return Some(*t);
    }
    let digits = text.get(..4).filter(|p| p.eq_ignore_ascii_case("TYPE"))?;
    text[digits.len()..].parse().ok()
}

/// The display name of an rcode (`NOERROR`, `REFUSED`, ..., `RCODE11`).
pub fn rcode_name(rcode: u8) -> String {
    const NAMES: [&str; 11] = [
        "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "YXDOMAIN", "YXRRSET",
        "NXRRSET", "NOTAUTH", "NOTZONE",
    ];
    NAMES
        .get(rcode as usize)
        .map_or_else(|| format!("RCODE{rcode}"), |n| (*n).to_string())
}

/// Appends the wire form of a presentation-format name (`www.example.com`, with or without
/// the trailing dot; `\.` and `\DDD` escapes) to `out`. The case is kept.
pub fn encode_name(text: &str, out: &mut Vec<u8>) -> Result<(), &'static str> {
    let start = out.len();
    if text == "." {
        out.push(0);
        return Ok(());
    }
    if text.is_empty() {
        return Err("empty name");
    }
    let bytes = text.as_bytes();
    let mut label_start = out.len();
    out.push(0);
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'.' => {
                let len = out.len() - label_start - 1;
                if len == 0 {
                    return Err("empty label");
                }
                if i + 1 == bytes.len() {
                    break;
                }
                label_start = out.len();
                out.push(0);
                i += 1;
                continue;
            }
            b'\\' => {
                let rest = &bytes[i + 1..];
                if rest.len() >= 3 && rest[..3].iter().all(u8::is_ascii_digit) {
                    let v = u32::from(rest[0] - b'0') * 100
                        + u32::from(rest[1] - b'0') * 10
                        + u32::from(rest[2] - b'0');
                    out.push(u8::try_from(v).map_err(|_| "escape above \\255")?);
                    i += 4;
                } else if let Some(&c) = rest.first() {
                    out.push(c);
                    i += 2;
                } else {
                    return Err("dangling backslash");
                }
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
        let len = out.len() - label_start - 1;
        if len > 63 {
            return Err("label longer than 63 bytes");
        }
        out[label_start] = len as u8;
    }
    if out.len() - label_start - 1 == 0 && out.len() - start > 1 {
        return Err("empty label");
    }
    out.push(0);
    if out.len() - start > 255 {
        return Err("name longer than 255 bytes");
    }
    Ok(())
}

/// The message ID.
pub fn id(msg: &[u8]) -> u16 {
    u16::from_be_bytes([msg[0], msg[1]])
}

/// A 16-bit header field at byte offset `at` (4: QDCOUNT, 6: ANCOUNT, 8: NSCOUNT, 10: ARCOUNT).
pub fn u16_at(msg: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*msg.get(at)?, *msg.get(at + 1)?]))
}

/// The end offset of an uncompressed name starting at `at`, or `None` when it runs past the
/// message, uses compression or exceeds 255 bytes.
pub fn name_end(msg: &[u8], at: usize) -> Option<usize> {
    let mut pos = at;
    loop {
        let len = *msg.get(pos)? as usize;
        if len == 0 {
            let end = pos + 1;
            return (end - at <= 255).then_some(end);
        }
        if len > 63 {
            return None;
        }
        pos += 1 + len;
        if pos - at > 255 {
            return None;
        }
    }
}

/// The end offset of a name starting at `at` that may end in a compression pointer.
pub fn skip_name(msg: &[u8], at: usize) -> Option<usize> {
    let mut pos = at;
    loop {
        let len = *msg.get(pos)? as usize;
        match len {
            0 => return Some(pos + 1),
            1..=63 => pos += 1 + len,
            0xC0..=0xFF => {
                msg.get(pos + 1)?;
                return Some(pos + 2);
            }
            _ => return None,
        }
        if pos - at > 255 {
            return None;
        }
    }
}

/// The end offset of the (single) question of a message, when well formed and uncompressed.
pub fn question_end(msg: &[u8]) -> Option<usize> {
    let end = name_end(msg, HEADER_LEN)? + 4;
    (end <= msg.len()).then_some(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(text: &str) -> Result<Vec<u8>, &'static str> {
        let mut v = Vec::new();
        encode_name(text, &mut v).map(|()| v)
    }

    #[test]
    fn encodes_names() {
        assert_eq!(enc(".").unwrap(), b"\0");
        assert_eq!(enc("a").unwrap(), b"\x01a\0");
        assert_eq!(enc("Ab.c.").unwrap(), b"\x02Ab\x01c\0");
        assert_eq!(enc(r"a\.b.c").unwrap(), b"\x03a.b\x01c\0");
        assert_eq!(enc(r"\065x").unwrap(), b"\x02Ax\0");
        assert!(enc("").is_err());
        assert!(enc("a..b").is_err());
        assert!(enc(".a").is_err());
        assert!(enc(r"\256").is_err());
        assert!(enc(&"a".repeat(64)).is_err());
        assert!(enc(&"a".repeat(63)).is_ok());
        let long = vec!["a".repeat(63); 4].join(".");
        assert!(enc(&long).is_err());
    }

    #[test]
    fn types_and_rcodes() {
        assert_eq!(parse_type("aaaa"), Some(28));
        assert_eq!(parse_type("TYPE65"), Some(65));
        assert_eq!(parse_type("type1"), Some(1));
        assert_eq!(parse_type("BOGUS"), None);
        assert_eq!(parse_type("TYP"), None);
        assert_eq!(rcode_name(5), "REFUSED");
        assert_eq!(rcode_name(12), "RCODE12");
    }

    #[test]
    fn walks_names() {
        let msg = b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01a\x00\x00\x01\x00\x01";
        assert_eq!(question_end(msg), Some(msg.len()));
        assert_eq!(question_end(&msg[..msg.len() - 1]), None);
        assert_eq!(name_end(b"\xC0\x0C", 0), None);
        assert_eq!(skip_name(b"\x01a\xC0\x0C", 0), Some(4));
        assert_eq!(skip_name(b"\x01a\x80", 0), None);
        assert_eq!(name_end(b"\x05ab", 0), None);
    }
}
