//! dnsperf-format query files (`name TYPE` a line), encoded once into wire format.
//!
//! Each query is stored as a complete DNS message with ID 0; the sender copies the bytes and
//! patches the two ID bytes, so sending allocates nothing.

use std::path::Path;

use thiserror::Error;

use crate::wire;

/// Why a query file could not be loaded.
#[derive(Debug, Error)]
pub enum QueryFileError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line is not `name [TYPE]`.
    #[error("line {line}: {reason}")]
    Parse {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// No query in the file (only blank lines and comments).
    #[error("no query in the file")]
    Empty,
}

/// Options for encoding the queries.
#[derive(Debug, Clone, Copy, Default)]
pub struct EncodeOptions {
    /// Add an EDNS0 OPT record advertising this UDP payload size.
    pub edns_udp_size: Option<u16>,
    /// Set the DO bit in the OPT record (implies EDNS0).
    pub dnssec_ok: bool,
    /// Clear the RD bit (recursion desired is set by default, as dnsperf does).
    pub no_recurse: bool,
}

#[derive(Debug, Clone, Copy)]
struct Span {
    offset: u32,
    len: u16,
    question_len: u16,
}

/// The encoded queries of one file, in file order.
#[derive(Debug, Clone)]
pub struct QuerySet {
    wire: Vec<u8>,
    spans: Vec<Span>,
}

impl QuerySet {
    /// Reads and encodes a query file.
    pub fn load(path: &Path, options: EncodeOptions) -> Result<Self, QueryFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| QueryFileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, options)
    }

    /// Encodes the queries of a query file's text.
    pub fn parse(text: &str, options: EncodeOptions) -> Result<Self, QueryFileError> {
        let mut set = QuerySet {
            wire: Vec::with_capacity(text.len() * 2),
            spans: Vec::new(),
        };
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_whitespace();
            let name = fields.next().unwrap_or_default();
            let qtype = match fields.next() {
                Some(t) => wire::parse_type(t).ok_or_else(|| QueryFileError::Parse {
                    line: index + 1,
                    reason: format!("unknown query type {t:?}"),
                })?,
                None => wire::TYPE_A,
            };
            set.push(name, qtype, options)
                .map_err(|reason| QueryFileError::Parse {
                    line: index + 1,
                    reason,
                })?;
        }
        if set.spans.is_empty() {
            return Err(QueryFileError::Empty);
        }
        Ok(set)
    }

    fn push(&mut self, name: &str, qtype: u16, options: EncodeOptions) -> Result<(), String> {
        let offset = self.wire.len();
        let flags: u16 = if options.no_recurse { 0 } else { 0x0100 };
        let edns = options.edns_udp_size.is_some() || options.dnssec_ok;
        self.wire.extend_from_slice(&[0, 0]);
        self.wire.extend_from_slice(&flags.to_be_bytes());
        self.wire
            .extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, u8::from(edns)]);
        let qstart = self.wire.len();
        if let Err(e) = wire::encode_name(name, &mut self.wire) {
            self.wire.truncate(offset);
            return Err(format!("bad name {name:?}: {e}"));
        }
        self.wire.extend_from_slice(&qtype.to_be_bytes());
        self.wire.extend_from_slice(&wire::CLASS_IN.to_be_bytes());
        let question_len = self.wire.len() - qstart;
        if edns {
            let size = options.edns_udp_size.unwrap_or(1232);
            let do_bit: u16 = if options.dnssec_ok { 0x8000 } else { 0 };
            self.wire.push(0);
            self.wire.extend_from_slice(&wire::TYPE_OPT.to_be_bytes());
            self.wire.extend_from_slice(&size.to_be_bytes());
            self.wire.extend_from_slice(&[0, 0]);
            self.wire.extend_from_slice(&do_bit.to_be_bytes());
            self.wire.extend_from_slice(&[0, 0]);
        }
        self.spans.push(Span {
            offset: offset as u32,
            len: (self.wire.len() - offset) as u16,
            question_len: question_len as u16,
        });
        Ok(())
    }

    /// Number of queries.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Whether there is no query (never true for a loaded set).
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// The wire bytes of query `i` (ID 0).
    pub fn message(&self, i: usize) -> &[u8] {
        let s = self.spans[i];
        &self.wire[s.offset as usize..s.offset as usize + s.len as usize]
    }

    /// The question section (name, type, class) of query `i`.
    pub fn question(&self, i: usize) -> &[u8] {
        let s = self.spans[i];
        let start = s.offset as usize + wire::HEADER_LEN;
        &self.wire[start..start + s.question_len as usize]
    }

    /// The longest encoded query.
    pub fn max_len(&self) -> usize {
        self.spans.iter().map(|s| s.len as usize).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dnsperf_format() {
        let text =
            "; comment\n# other comment\n\nwww.Example.com A\nexample.org. AAAA\n  x.y\tMX \n";
        let set = QuerySet::parse(text, EncodeOptions::default()).unwrap();
        assert_eq!(set.len(), 3);
        let q = set.message(0);
        assert_eq!(&q[..12], &[0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&q[12..], b"\x03www\x07Example\x03com\x00\x00\x01\x00\x01");
        assert_eq!(set.question(0), &q[12..]);
        assert_eq!(
            &set.message(1)[12..],
            b"\x07example\x03org\x00\x00\x1c\x00\x01"
        );
        assert_eq!(&set.message(2)[12..], b"\x01x\x01y\x00\x00\x0f\x00\x01");
    }

    #[test]
    fn adds_edns() {
        let options = EncodeOptions {
            edns_udp_size: Some(4096),
            dnssec_ok: true,
            no_recurse: false,
        };
        let set = QuerySet::parse("a A", options).unwrap();
        let q = set.message(0);
        assert_eq!(&q[10..12], &[0, 1]);
        assert_eq!(&q[q.len() - 11..], &[0, 0, 41, 16, 0, 0, 0, 0x80, 0, 0, 0]);
        assert_eq!(set.question(0), b"\x01a\x00\x00\x01\x00\x01");
    }

    #[test]
    fn rejects_bad_lines() {
        for (text, line) in [
            ("ok A\nbad..name A", 2),
            ("x A\ny BOGUS", 2),
            (&format!("{} A", "a".repeat(64)), 1),
        ] {
            match QuerySet::parse(text, EncodeOptions::default()) {
                Err(QueryFileError::Parse { line: l, .. }) => assert_eq!(l, line, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!(matches!(
            QuerySet::parse("; nothing\n\n", EncodeOptions::default()),
            Err(QueryFileError::Empty)
        ));
    }
}
