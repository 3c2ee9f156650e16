//! Load errors: every problem of a load, each as `FILE:LINE: reason`.

use std::fmt;
use std::path::{Path, PathBuf};

use dnsfence_matcher::PatternError;

/// What is wrong at one place of a policy or endpoints file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadErrorKind {
    /// The file or directory could not be read (reported at line 0).
    #[error("cannot read: {0}")]
    Io(String),
    /// A directory holds no `*.yaml` / `*.yml` file (reported at line 0).
    #[error("no *.yaml or *.yml files in directory")]
    EmptyDirectory,
    /// The file holds nothing, not even a comment (reported at line 0). A zero-byte file is
    /// what a writer that truncates before it writes leaves for a moment, so it never counts
    /// as "no policy": a file that removes every policy says so with a comment.
    #[error(
        "empty file: taken for one caught half-written; to remove every policy or endpoint, \
         leave a comment (e.g. `# none`) or remove the file"
    )]
    Empty,
    /// The file changed while it was read, at every try (reported at line 0).
    #[error("the file kept changing while it was read")]
    Unstable,
    /// The file is not UTF-8 (reported at line 0).
    #[error("not UTF-8 text")]
    NotUtf8,
    /// The YAML itself is malformed.
    #[error("YAML syntax error: {0}")]
    Syntax(String),
    /// A field dnsfence does not enforce; the policy is rejected rather than half-enforced.
    #[error("{field}: unsupported field{hint}")]
    Unsupported {
        /// Path of the field, e.g. `spec.egress[1].toCIDRSet`.
        field: String,
        /// What is supported instead, with a leading space and parentheses, or empty.
        hint: &'static str,
    },
    /// A required field is absent.
    #[error("{field}: required field missing")]
    Missing {
        /// Path of the missing field.
        field: String,
    },
    /// A `matchName` / `matchPattern` the matcher rejects.
    #[error("{field}: {error}")]
    Pattern {
        /// Path of the pattern field.
        field: String,
        /// The matcher's reason.
        error: PatternError,
    },
    /// Any other invalid value: wrong type, bad port, unknown protocol, duplicate, ...
    #[error("{field}: {reason}")]
    Invalid {
        /// Path of the offending field (or of the document, e.g. `kind`).
        field: String,
        /// Why it is invalid.
        reason: String,
    },
}

/// One problem, located in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    /// The file (or directory) as it was named or found.
    pub file: PathBuf,
    /// 1-based line of the offending YAML node; 0 when the problem concerns the whole file.
    pub line: usize,
    /// What is wrong.
    pub kind: LoadErrorKind,
}

impl LoadError {
    pub(crate) fn new(file: &Path, line: usize, kind: LoadErrorKind) -> LoadError {
        LoadError {
            file: file.to_path_buf(),
            line,
            kind,
        }
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.kind)
    }
}

impl std::error::Error for LoadError {}

/// Every problem found by one load, in file order. Displays one `FILE:LINE: reason` per line.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoadErrors(pub Vec<LoadError>);

impl LoadErrors {
    /// The individual errors.
    pub fn errors(&self) -> &[LoadError] {
        &self.0
    }

    /// Number of errors.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there is no error.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for LoadErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for LoadErrors {}
