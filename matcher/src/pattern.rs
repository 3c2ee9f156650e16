//! `matchName` / `matchPattern` parsing and validation (Cilium v1.19 semantics).

use std::fmt;

use crate::name::is_name_byte;

/// Longest pattern accepted, in characters, after trimming and not counting a trailing dot
/// (Cilium's `MaxLength=255`).
pub const MAX_PATTERN_LEN: usize = 255;

/// Which field a pattern came from: they differ only in whether `*` is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatternKind {
    /// `matchName`: an exact name, characters `[-a-zA-Z0-9_.]`.
    Name,
    /// `matchPattern`: characters `[-a-zA-Z0-9_.*]`, `*` globs within a label, `**.` prefix.
    Pattern,
}

/// Why a pattern was rejected. Every variant carries the pattern as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatternError {
    /// The pattern is empty (or only whitespace).
    Empty {
        /// The pattern as given.
        pattern: String,
    },
    /// More than 255 characters.
    TooLong {
        /// The pattern as given.
        pattern: String,
        /// Its length in characters, after trimming.
        len: usize,
    },
    /// A character outside the allowed set (`*` is not allowed in `matchName`).
    InvalidChar {
        /// The pattern as given.
        pattern: String,
        /// The offending character.
        ch: char,
        /// Its 1-based position in the trimmed pattern.
        position: usize,
        /// Which field the pattern came from.
        kind: PatternKind,
    },
    /// An empty label: `a..b`, a leading dot, `..` at the end, or `.` alone.
    EmptyLabel {
        /// The pattern as given.
        pattern: String,
    },
}

impl fmt::Display for PatternError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PatternError::Empty { pattern } => write!(f, "invalid pattern {pattern:?}: empty"),
            PatternError::TooLong { pattern, len } => write!(
                f,
                "invalid pattern {pattern:?}: {len} characters, more than {MAX_PATTERN_LEN}"
            ),
            PatternError::InvalidChar {
                pattern,
                ch,
                position,
                kind,
            } => {
                let allowed = match kind {
                    PatternKind::Name => "[-a-zA-Z0-9_.]",
                    PatternKind::Pattern => "[-a-zA-Z0-9_.*]",
                };
                write!(
                    f,
                    "invalid pattern {pattern:?}: character {ch:?} at position {position} is not \
                     one of {allowed}"
                )
            }
            PatternError::EmptyLabel { pattern } => {
                write!(f, "invalid pattern {pattern:?}: empty label")
            }
        }
    }
}

impl std::error::Error for PatternError {}

/// What one label of a pattern matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum LabelKind {
    /// Exactly its (lowercased) bytes.
    Literal,
    /// A label made only of stars: any one label.
    Any,
    /// A label with stars among other characters.
    Glob,
}

/// One label of a pattern: a byte range of the normalised text and its kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Label {
    start: u8,
    end: u8,
    pub(crate) kind: LabelKind,
}

/// The shape a pattern compiles to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Shape {
    /// Only stars (`*`, `**`, `*.`, `**.`): every valid name and the root.
    All,
    /// `labels` must match the rightmost labels of the name; with `subdomains` (a `**.` prefix)
    /// one or more further labels must precede them, otherwise none.
    Labels {
        subdomains: bool,
        labels: Vec<Label>,
    },
}

/// A validated, normalised `matchName` or `matchPattern`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    /// Trimmed, lowercased, with a trailing dot.
    normalized: Box<str>,
    shape: Shape,
}

impl Pattern {
    /// Parses a `matchPattern`.
    pub fn parse(pattern: &str) -> Result<Pattern, PatternError> {
        Pattern::parse_as(pattern, PatternKind::Pattern)
    }

    /// Parses a `matchName` (no `*`).
    pub fn parse_name(name: &str) -> Result<Pattern, PatternError> {
        Pattern::parse_as(name, PatternKind::Name)
    }

    /// Parses `input` as the given kind of pattern.
    pub fn parse_as(input: &str, kind: PatternKind) -> Result<Pattern, PatternError> {
        let trimmed = input.trim();
        if trimmed.is_empty() {
            return Err(PatternError::Empty {
                pattern: input.to_owned(),
            });
        }
        let len = trimmed.chars().count();
        // A trailing dot is not counted: normalisation adds one, and the normalised form of
        // a 255-character pattern must parse again (libFuzzer, `pattern_parse`, found a
        // 255-character pattern whose normalised form was refused as 256).
        if len - usize::from(trimmed.ends_with('.')) > MAX_PATTERN_LEN {
            return Err(PatternError::TooLong {
                pattern: input.to_owned(),
                len,
            });
        }
        for (i, ch) in trimmed.chars().enumerate() {
            let ok = match ch {
                '.' => true,
                '*' => kind == PatternKind::Pattern,
                c => c.is_ascii() && is_name_byte(c as u8),
            };
            if !ok {
                return Err(PatternError::InvalidChar {
                    pattern: input.to_owned(),
                    ch,
                    position: i + 1,
                    kind,
                });
            }
        }
        // Only ASCII is left, so byte operations are character operations from here on.
        let mut text = String::with_capacity(trimmed.len() + 1);
        text.extend(trimmed.chars().map(|c| c.to_ascii_lowercase()));
        if !text.ends_with('.') {
            text.push('.');
        }
        let body_len = text.len() - 1;
        let empty_label = || PatternError::EmptyLabel {
            pattern: input.to_owned(),
        };
        if body_len == 0 {
            return Err(empty_label());
        }
        let body = &text.as_bytes()[..body_len];
        if body.iter().all(|&b| b == b'*') {
            return Ok(Pattern {
                normalized: text.into(),
                shape: Shape::All,
            });
        }
        let subdomains = body.starts_with(b"**.");
        let first = if subdomains { 3 } else { 0 };
        let mut labels =
            Vec::with_capacity(body[first..].iter().filter(|&&b| b == b'.').count() + 1);
        let mut start = first;
        for (i, &b) in body
            .iter()
            .enumerate()
            .skip(first)
            .chain([(body_len, &b'.')])
        {
            if b != b'.' {
                continue;
            }
            let label = &body[start..i];
            if label.is_empty() {
                return Err(empty_label());
            }
            let kind = if label.iter().all(|&b| b == b'*') {
                LabelKind::Any
            } else if label.contains(&b'*') {
                LabelKind::Glob
            } else {
                LabelKind::Literal
            };
            // The text is at most 256 bytes, so offsets fit a byte.
            labels.push(Label {
                start: start as u8,
                end: i as u8,
                kind,
            });
            start = i + 1;
        }
        Ok(Pattern {
            normalized: text.into(),
            shape: Shape::Labels { subdomains, labels },
        })
    }

    /// The bytes of `label`, one of this pattern's labels.
    pub(crate) fn label_bytes(&self, label: &Label) -> &[u8] {
        &self.normalized.as_bytes()[usize::from(label.start)..usize::from(label.end)]
    }

    /// The pattern trimmed, lowercased, with a trailing dot.
    pub fn as_str(&self) -> &str {
        &self.normalized
    }

    /// Whether the pattern matches every name (it is made only of stars).
    pub fn is_match_all(&self) -> bool {
        self.shape == Shape::All
    }

    pub(crate) fn shape(&self) -> &Shape {
        &self.shape
    }

    /// The anchored regular expression Cilium v1.19 builds for this pattern, to be matched
    /// against a lowercased name with its trailing dot. Used as the reference in tests and
    /// benchmarks; dnsfence itself never compiles it.
    pub fn to_anchored_regex(&self) -> String {
        const GROUP: &str = "[-a-zA-Z0-9_]";
        let body = match &self.shape {
            Shape::All => return format!("(^({GROUP}+[.])+$)|(^[.]$)"),
            Shape::Labels {
                subdomains: true, ..
            } => {
                let rest = &self.normalized["**.".len()..];
                format!("({GROUP}+[.])+{}", escape(rest, GROUP))
            }
            Shape::Labels {
                subdomains: false, ..
            } => escape(&self.normalized, GROUP),
        };
        format!("^{body}$")
    }
}

/// Cilium's `escapeRegexpCharacters`: `.` becomes a literal dot, `*` any run of name characters.
fn escape(pattern: &str, group: &str) -> String {
    pattern
        .replace('.', "[.]")
        .replace('*', &format!("{group}*"))
}

/// A glob label with runs of stars collapsed to one (`a**b` behaves as `a*b`).
pub(crate) fn collapse_stars(label: &[u8], out: &mut Vec<u8>) {
    out.clear();
    for &b in label {
        if !(b == b'*' && out.last() == Some(&b'*')) {
            out.push(b);
        }
    }
}

/// Whether `label` (lowercased name bytes, no `*`) matches `glob` (stars collapsed).
///
/// Classic linear-time wildcard matching with one backtrack point: the last star seen.
pub(crate) fn glob_match(glob: &[u8], label: &[u8]) -> bool {
    let (mut g, mut l) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while l < label.len() {
        match glob.get(g) {
            Some(b'*') => {
                star = Some((g, l));
                g += 1;
            }
            Some(&c) if c == label[l] => {
                g += 1;
                l += 1;
            }
            _ => match star {
                Some((sg, sl)) => {
                    g = sg + 1;
                    l = sl + 1;
                    star = Some((sg, sl + 1));
                }
                None => return false,
            },
        }
    }
    glob[g..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_basics() {
        assert!(glob_match(b"part*ial", b"partial"));
        assert!(glob_match(b"part*ial", b"part-extra-ial"));
        assert!(!glob_match(b"part*ial", b"partia"));
        assert!(glob_match(b"*cilium", b"cilium"));
        assert!(glob_match(b"*cilium", b"wwwcilium"));
        assert!(glob_match(b"a*b*c", b"axxbyyc"));
        assert!(!glob_match(b"a*b*c", b"axxbyy"));
        assert!(glob_match(b"a*", b"a"));
        assert!(glob_match(b"*a*", b"bab"));
        assert!(!glob_match(b"*a*", b"bbb"));
    }

    #[test]
    fn normalisation() {
        assert_eq!(
            Pattern::parse(" *.Cilium.IO ").unwrap().as_str(),
            "*.cilium.io."
        );
        assert_eq!(Pattern::parse("cilium.io.").unwrap().as_str(), "cilium.io.");
        assert!(Pattern::parse("**.").unwrap().is_match_all());
        assert!(!Pattern::parse("*.*").unwrap().is_match_all());
    }

    #[test]
    fn errors_name_the_pattern_and_reason() {
        let e = Pattern::parse("a..b").unwrap_err();
        assert_eq!(e.to_string(), r#"invalid pattern "a..b": empty label"#);
        let e = Pattern::parse_name("*.b").unwrap_err();
        assert!(e.to_string().contains("'*' at position 1"), "{e}");
        let e = Pattern::parse("a/b").unwrap_err();
        assert!(e.to_string().contains("'/' at position 2"), "{e}");
        assert!(matches!(
            Pattern::parse("").unwrap_err(),
            PatternError::Empty { .. }
        ));
        assert!(matches!(
            Pattern::parse(".").unwrap_err(),
            PatternError::EmptyLabel { .. }
        ));
        assert!(matches!(
            Pattern::parse(".a").unwrap_err(),
            PatternError::EmptyLabel { .. }
        ));
        assert!(matches!(
            Pattern::parse("a..").unwrap_err(),
            PatternError::EmptyLabel { .. }
        ));
        let long = "a".repeat(256);
        assert!(matches!(
            Pattern::parse(&long).unwrap_err(),
            PatternError::TooLong { len: 256, .. }
        ));
        assert!(Pattern::parse(&"a".repeat(255)).is_ok());
        // Its normalised form (with the trailing dot) parses again; a 256th character before
        // the dot does not.
        let p = Pattern::parse(&"a".repeat(255)).unwrap();
        assert_eq!(Pattern::parse(p.as_str()).unwrap(), p);
        assert!(Pattern::parse(&format!("{}.", "a".repeat(256))).is_err());
    }

    #[test]
    fn regex_forms() {
        let g = "[-a-zA-Z0-9_]";
        assert_eq!(
            Pattern::parse("*.x").unwrap().to_anchored_regex(),
            format!("^{g}*[.]x[.]$")
        );
        assert_eq!(
            Pattern::parse("**.x").unwrap().to_anchored_regex(),
            format!("^({g}+[.])+x[.]$")
        );
    }
}
