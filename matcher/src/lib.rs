//! FQDN pattern matching with Cilium v1.19 `matchName` / `matchPattern` semantics.
//!
//! Patterns are validated into [`Pattern`]s, tagged with caller-chosen [`RuleId`]s, and compiled
//! by a [`MatcherBuilder`] into one [`Matcher`]: a trie over reversed labels whose lookup cost
//! does not grow with the number of patterns. Query names are validated and case-folded once
//! into a [`Name`] (from DNS wire format or text) and can then be looked up in any number of
//! matchers. Nothing here allocates per lookup, performs I/O, or uses `unsafe`.
//!
//! ```
//! use dnsfence_matcher::{MatcherBuilder, Name, Pattern, RuleId};
//!
//! let mut builder = MatcherBuilder::new();
//! builder.add(Pattern::parse("*.cilium.io").unwrap(), RuleId(1));
//! builder.add(Pattern::parse_name("api.stripe.com").unwrap(), RuleId(2));
//! let matcher = builder.build();
//!
//! assert!(matcher.is_match(&Name::from_text("Sub.Cilium.IO").unwrap()));
//! assert!(!matcher.is_match(&Name::from_text("cilium.io").unwrap()));
//! let wire = b"\x03api\x06stripe\x03com\x00";
//! assert_eq!(matcher.matches(&Name::from_wire(wire).unwrap()), [RuleId(2)]);
//! ```
#![forbid(unsafe_code)]

mod name;
mod pattern;
mod trie;

pub use name::{MAX_LABEL_LEN, MAX_WIRE_LEN, Name, NameError};
pub use pattern::{MAX_PATTERN_LEN, Pattern, PatternError, PatternKind};
pub use trie::{Matcher, MatcherBuilder, RuleId, RuleSet};
