//! Query names, validated and case-folded once, ready for any number of lookups.

use std::fmt;

/// Longest name in wire form, the root's zero byte included (RFC 1035 §2.3.4).
pub const MAX_WIRE_LEN: usize = 255;
/// Longest label (RFC 1035 §2.3.4).
pub const MAX_LABEL_LEN: usize = 63;
/// Most labels a name of [`MAX_WIRE_LEN`] bytes can hold.
const MAX_LABELS: usize = 127;

/// Bytes allowed in a label of a name: `[-a-zA-Z0-9_]` (Cilium's `allowedDNSCharsREGroup`).
pub(crate) const fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// Each byte's lowercase form when it is a name byte, 0 when it is not: one load per byte
/// validates and case-folds a label.
const FOLD: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        if is_name_byte(b as u8) {
            table[b] = (b as u8).to_ascii_lowercase();
        }
        b += 1;
    }
    table
};

/// Why a name cannot be matched. Invalid names match no pattern, not even `*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameError {
    /// A label is empty (`a..b`, a leading dot) or the wire form ends before its root label.
    EmptyLabel,
    /// A label is longer than 63 bytes.
    LabelTooLong,
    /// The name is longer than 255 bytes in wire form.
    TooLong,
    /// A byte outside `[-a-zA-Z0-9_]` (in text, `.` separates labels).
    InvalidByte(u8),
    /// A wire-format length byte is a compression pointer or a reserved label type.
    BadLabelType(u8),
    /// The wire form ends inside a label or before the root label.
    Truncated,
    /// Bytes follow the root label of a wire-format name given alone.
    TrailingBytes,
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameError::EmptyLabel => f.write_str("empty label"),
            NameError::LabelTooLong => f.write_str("label longer than 63 bytes"),
            NameError::TooLong => f.write_str("name longer than 255 bytes"),
            NameError::InvalidByte(b) => write!(f, "byte 0x{b:02x} not allowed in a name"),
            NameError::BadLabelType(b) => write!(f, "label type 0x{b:02x} not allowed here"),
            NameError::Truncated => f.write_str("name truncated"),
            NameError::TrailingBytes => f.write_str("bytes after the root label"),
        }
    }
}

impl std::error::Error for NameError {}

/// A valid domain name, lowercased, in wire form, with its label offsets.
///
/// Built once per query (from the question's wire bytes or from text) and then looked up in as
/// many matchers as needed. It lives on the stack: building and matching never allocate.
#[derive(Clone)]
pub struct Name {
    /// Lowercased wire form, root zero included.
    wire: [u8; MAX_WIRE_LEN],
    /// Length of `wire` in use.
    len: u8,
    /// Offset of each label's length byte, left to right.
    starts: [u8; MAX_LABELS],
    /// Number of labels (0 for the root).
    labels: u8,
}

impl Name {
    /// The root name `.`.
    pub const fn root() -> Name {
        let mut wire = [0u8; MAX_WIRE_LEN];
        wire[0] = 0;
        Name {
            wire,
            len: 1,
            starts: [0; MAX_LABELS],
            labels: 0,
        }
    }

    /// Parses an uncompressed wire-format name at the start of `bytes`, returning the name and
    /// the number of bytes it took (the root label included). Bytes after it are not looked at.
    pub fn parse_wire_prefix(bytes: &[u8]) -> Result<(Name, usize), NameError> {
        let mut name = Name::root();
        let used = name.parse_wire_into(bytes)?;
        Ok((name, used))
    }

    /// Parses into `self` (which must be the root), returning the bytes used: no move of the
    /// name's 400 bytes on the way out.
    #[inline]
    fn parse_wire_into(&mut self, bytes: &[u8]) -> Result<usize, NameError> {
        let name = self;
        let mut pos = 0usize;
        loop {
            let Some(&len) = bytes.get(pos) else {
                return Err(NameError::Truncated);
            };
            if len == 0 {
                name.wire[pos] = 0;
                name.len = (pos + 1) as u8;
                return Ok(pos + 1);
            }
            if len & 0xC0 != 0 {
                return Err(NameError::BadLabelType(len));
            }
            let len = usize::from(len);
            // The label, its length byte and the root byte that must still follow.
            if pos + 1 + len + 1 > MAX_WIRE_LEN {
                return Err(NameError::TooLong);
            }
            let Some(label) = bytes.get(pos + 1..pos + 1 + len) else {
                return Err(NameError::Truncated);
            };
            name.push_label(pos, label)?;
            pos += 1 + len;
        }
    }

    /// Parses a whole uncompressed wire-format name; nothing may follow its root label.
    pub fn from_wire(bytes: &[u8]) -> Result<Name, NameError> {
        let mut name = Name::root();
        if name.parse_wire_into(bytes)? != bytes.len() {
            return Err(NameError::TrailingBytes);
        }
        Ok(name)
    }

    /// Parses a name in text form: surrounding whitespace trimmed, case folded, the trailing dot
    /// optional. `""` and `"."` are the root.
    pub fn from_text(text: &str) -> Result<Name, NameError> {
        let text = text.trim().as_bytes();
        let text = text.strip_suffix(b".").unwrap_or(text);
        let mut name = Name::root();
        if text.is_empty() {
            return Ok(name);
        }
        let mut pos = 0usize;
        for label in text.split(|&b| b == b'.') {
            if pos + 1 + label.len() + 1 > MAX_WIRE_LEN {
                // Report label faults first: they are the more precise reason.
                if label.len() > MAX_LABEL_LEN {
                    return Err(NameError::LabelTooLong);
                }
                return Err(NameError::TooLong);
            }
            name.push_label(pos, label)?;
            pos += 1 + label.len();
        }
        name.wire[pos] = 0;
        name.len = (pos + 1) as u8;
        Ok(name)
    }

    /// Appends `label` whose length byte goes at `pos`; the caller checked the total length.
    fn push_label(&mut self, pos: usize, label: &[u8]) -> Result<(), NameError> {
        if label.is_empty() {
            return Err(NameError::EmptyLabel);
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(NameError::LabelTooLong);
        }
        self.wire[pos] = label.len() as u8;
        let dst = &mut self.wire[pos + 1..pos + 1 + label.len()];
        for i in 0..dst.len() {
            let b = label[i];
            let folded = FOLD[usize::from(b)];
            if folded == 0 {
                return Err(NameError::InvalidByte(b));
            }
            dst[i] = folded;
        }
        // At most 127 labels fit in 255 bytes, so this index is in range.
        self.starts[usize::from(self.labels)] = pos as u8;
        self.labels += 1;
        Ok(())
    }

    /// Number of labels; 0 for the root.
    pub fn label_count(&self) -> usize {
        usize::from(self.labels)
    }

    /// Whether this is the root name.
    pub fn is_root(&self) -> bool {
        self.labels == 0
    }

    /// Label `i`, counted from the left, lowercased, without its length byte.
    ///
    /// # Panics
    /// If `i >= self.label_count()`.
    #[inline]
    pub fn label(&self, i: usize) -> &[u8] {
        assert!(i < self.label_count(), "label index out of range");
        let start = usize::from(self.starts[i]);
        let len = usize::from(self.wire[start]);
        &self.wire[start + 1..start + 1 + len]
    }

    /// Label `i` (as [`Name::label`]) and its length byte and first 7 bytes as a
    /// little-endian word, the bytes past the label zero (the trie keeps the same word per exact
    /// edge: one compare decides a label of up to 7 bytes).
    #[inline]
    pub(crate) fn label_and_head(&self, i: usize) -> (&[u8], u64) {
        let start = usize::from(self.starts[i]);
        let len = usize::from(self.wire[start]);
        let word = match self.wire[start..].first_chunk::<8>() {
            Some(&bytes) => bytes,
            None => {
                // Near the end of the buffer: the label ends within these bytes.
                let mut word = [0u8; 8];
                let end = start + 1 + len;
                word[..end - start].copy_from_slice(&self.wire[start..end]);
                word
            }
        };
        // Keep the length byte and at most 7 label bytes.
        let keep = (len + 1).min(8);
        let head = u64::from_le_bytes(word) & (u64::MAX >> (64 - 8 * keep));
        (&self.wire[start + 1..start + 1 + len], head)
    }

    /// The lowercased wire form, root label included.
    pub fn wire(&self) -> &[u8] {
        &self.wire[..usize::from(self.len)]
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Name) -> bool {
        self.wire() == other.wire()
    }
}

impl Eq for Name {}

impl std::hash::Hash for Name {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.wire().hash(state);
    }
}

/// Text form, lowercased, with the trailing dot (`.` for the root).
impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_root() {
            return f.write_str(".");
        }
        for i in 0..self.label_count() {
            // Labels hold only `[-a-z0-9_]`, so they are ASCII.
            for &b in self.label(i) {
                fmt::Write::write_char(f, char::from(b))?;
            }
            f.write_str(".")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Name({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_wire_agree() {
        let a = Name::from_text(" WWW.Example.COM. ").unwrap();
        let b = Name::from_wire(b"\x03www\x07example\x03com\x00").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "www.example.com.");
        assert_eq!(a.label_count(), 3);
        assert_eq!(a.label(0), b"www");
        assert_eq!(a.label(2), b"com");
    }

    #[test]
    fn root_forms() {
        for t in ["", ".", "  ", " . "] {
            assert!(Name::from_text(t).unwrap().is_root(), "{t:?}");
        }
        assert!(Name::from_wire(b"\x00").unwrap().is_root());
    }

    #[test]
    fn rejects_bad_names() {
        assert_eq!(Name::from_text("a..b").unwrap_err(), NameError::EmptyLabel);
        assert_eq!(Name::from_text(".a").unwrap_err(), NameError::EmptyLabel);
        assert_eq!(Name::from_text("a..").unwrap_err(), NameError::EmptyLabel);
        assert_eq!(
            Name::from_text("a b.c").unwrap_err(),
            NameError::InvalidByte(b' ')
        );
        assert_eq!(
            Name::from_text("*.c").unwrap_err(),
            NameError::InvalidByte(b'*')
        );
        assert_eq!(
            Name::from_text(&"a".repeat(64)).unwrap_err(),
            NameError::LabelTooLong
        );
        assert!(Name::from_text(&"a".repeat(63)).is_ok());
        assert_eq!(
            Name::from_wire(b"\x03www").unwrap_err(),
            NameError::Truncated
        );
        assert_eq!(
            Name::from_wire(b"\x03ww").unwrap_err(),
            NameError::Truncated
        );
        assert_eq!(Name::from_wire(b"").unwrap_err(), NameError::Truncated);
        assert_eq!(
            Name::from_wire(b"\xc0\x0c").unwrap_err(),
            NameError::BadLabelType(0xc0)
        );
        assert_eq!(
            Name::from_wire(b"\x01a\x00x").unwrap_err(),
            NameError::TrailingBytes
        );
        assert_eq!(Name::parse_wire_prefix(b"\x01a\x00x").unwrap().1, 3);
    }

    #[test]
    fn length_limits() {
        // 4 labels of 63 = 4 * 64 + 1 = 257 bytes: too long. 3 x 63 + 61 = 253 + 1 + 1 = 255: fits.
        let l63 = "a".repeat(63);
        let long = format!("{l63}.{l63}.{l63}.{l63}");
        assert_eq!(Name::from_text(&long).unwrap_err(), NameError::TooLong);
        let fits = format!("{l63}.{l63}.{l63}.{}", "b".repeat(61));
        let name = Name::from_text(&fits).unwrap();
        assert_eq!(name.wire().len(), 255);
        assert_eq!(Name::from_wire(name.wire()).unwrap(), name);
        let over = format!("{l63}.{l63}.{l63}.{}", "b".repeat(62));
        assert_eq!(Name::from_text(&over).unwrap_err(), NameError::TooLong);
        // 127 one-byte labels fill 255 bytes exactly; 128 do not fit.
        let many = vec!["x"; 127].join(".");
        assert_eq!(Name::from_text(&many).unwrap().label_count(), 127);
        let too_many = vec!["x"; 128].join(".");
        assert_eq!(Name::from_text(&too_many).unwrap_err(), NameError::TooLong);
        let mut wire = Vec::new();
        for _ in 0..128 {
            wire.extend_from_slice(b"\x01x");
        }
        wire.push(0);
        assert_eq!(Name::from_wire(&wire).unwrap_err(), NameError::TooLong);
    }
}
