//! Reading marked YAML nodes with field paths and `file:line` diagnostics.

use std::path::Path;

use saphyr::{LoadableYamlNode, MarkedYaml, Scalar, YamlData};

use crate::error::{LoadError, LoadErrorKind};

/// A YAML node with its position.
pub(crate) type Node<'a> = MarkedYaml<'a>;

/// 1-based line where `node` starts.
pub(crate) fn line(node: &Node<'_>) -> usize {
    node.span.start.line()
}

/// Parses every document of `text`; a syntax error is reported and yields no document.
pub(crate) fn parse_documents<'a>(diag: &mut Diag<'_>, text: &'a str) -> Vec<Node<'a>> {
    match MarkedYaml::load_from_str(text) {
        Ok(docs) => docs,
        Err(e) => {
            diag.push(
                e.marker().line(),
                LoadErrorKind::Syntax(e.info().to_string()),
            );
            Vec::new()
        }
    }
}

/// Collects the errors of one file.
pub(crate) struct Diag<'e> {
    pub(crate) file: &'e Path,
    pub(crate) errors: &'e mut Vec<LoadError>,
}

impl Diag<'_> {
    pub(crate) fn push(&mut self, line: usize, kind: LoadErrorKind) {
        self.errors.push(LoadError::new(self.file, line, kind));
    }

    pub(crate) fn invalid(&mut self, node: &Node<'_>, field: &str, reason: impl Into<String>) {
        let field = if field.is_empty() {
            "(document)"
        } else {
            field
        };
        self.push(
            line(node),
            LoadErrorKind::Invalid {
                field: field.to_string(),
                reason: reason.into(),
            },
        );
    }

    /// The entries of a mapping whose keys are all in `allowed`; other keys are reported as
    /// unsupported (with `hint`). `None` (reported) when `node` is not a mapping.
    pub(crate) fn mapping<'n, 'a>(
        &mut self,
        node: &'n Node<'a>,
        field: &str,
        allowed: &[&str],
        hint: &'static str,
    ) -> Option<Fields<'n, 'a>> {
        let YamlData::Mapping(map) = &node.data else {
            self.invalid(
                node,
                field,
                format!("expected a mapping, found {}", kind(node)),
            );
            return None;
        };
        let mut entries = Vec::with_capacity(map.len());
        for (key, value) in map.iter() {
            let Some(name) = scalar_str(key) else {
                self.invalid(key, field, "mapping keys must be strings");
                continue;
            };
            if allowed.contains(&name) {
                entries.push((name, key, value));
            } else {
                self.push(
                    line(key),
                    LoadErrorKind::Unsupported {
                        field: join(field, name),
                        hint,
                    },
                );
            }
        }
        Some(Fields { entries })
    }

    /// The items of a sequence; `None` (reported) when `node` is not a sequence.
    pub(crate) fn sequence<'n, 'a>(
        &mut self,
        node: &'n Node<'a>,
        field: &str,
    ) -> Option<&'n [Node<'a>]> {
        match &node.data {
            YamlData::Sequence(items) => Some(items),
            _ => {
                self.invalid(
                    node,
                    field,
                    format!("expected a list, found {}", kind(node)),
                );
                None
            }
        }
    }

    /// The items of a list that must not be empty; an empty list, or a node that is no list,
    /// is reported (and yields no items).
    pub(crate) fn non_empty_sequence<'n, 'a>(
        &mut self,
        node: &'n Node<'a>,
        field: &str,
    ) -> &'n [Node<'a>] {
        let items = self.sequence(node, field).unwrap_or_default();
        if items.is_empty() {
            self.invalid(node, field, "empty list");
        }
        items
    }

    /// A string scalar; `None` (reported) otherwise.
    pub(crate) fn string(&mut self, node: &Node<'_>, field: &str) -> Option<String> {
        match scalar_str(node) {
            Some(s) => Some(s.to_string()),
            None => {
                self.invalid(
                    node,
                    field,
                    format!("expected a string, found {}", kind(node)),
                );
                None
            }
        }
    }

    /// A mapping of strings to strings (labels); pairs with non-string parts are reported.
    pub(crate) fn string_map(&mut self, node: &Node<'_>, field: &str) -> Vec<(String, String)> {
        let YamlData::Mapping(map) = &node.data else {
            if !is_null(node) {
                self.invalid(
                    node,
                    field,
                    format!("expected a mapping, found {}", kind(node)),
                );
            }
            return Vec::new();
        };
        let mut out = Vec::with_capacity(map.len());
        for (key, value) in map.iter() {
            let Some(k) = self.string(key, field) else {
                continue;
            };
            let path = join(field, &k);
            if let Some(v) = self.string(value, &path) {
                out.push((k, v));
            }
        }
        out
    }
}

/// The known entries of a mapping, in document order.
pub(crate) struct Fields<'n, 'a> {
    entries: Vec<(&'n str, &'n Node<'a>, &'n Node<'a>)>,
}

impl<'n, 'a> Fields<'n, 'a> {
    /// The value of `key`.
    pub(crate) fn get(&self, key: &str) -> Option<&'n Node<'a>> {
        self.entries
            .iter()
            .find(|(k, _, _)| *k == key)
            .map(|(_, _, v)| *v)
    }

    /// The key node of `key` (for the line of a field whose value is a block).
    pub(crate) fn key(&self, key: &str) -> Option<&'n Node<'a>> {
        self.entries
            .iter()
            .find(|(k, _, _)| *k == key)
            .map(|(_, k, _)| *k)
    }

    /// The value of `key`, unless it is absent or null.
    pub(crate) fn get_non_null(&self, key: &str) -> Option<&'n Node<'a>> {
        self.get(key).filter(|v| !is_null(v))
    }
}

/// `parent.child`, or `child` at the top.
pub(crate) fn join(parent: &str, child: &str) -> String {
    if parent.is_empty() {
        child.to_string()
    } else {
        format!("{parent}.{child}")
    }
}

/// `parent[i]`.
pub(crate) fn index(parent: &str, i: usize) -> String {
    format!("{parent}[{i}]")
}

pub(crate) fn scalar_str<'n>(node: &'n Node<'_>) -> Option<&'n str> {
    match &node.data {
        YamlData::Value(Scalar::String(s)) => Some(s),
        _ => None,
    }
}

pub(crate) fn is_null(node: &Node<'_>) -> bool {
    matches!(node.data, YamlData::Value(Scalar::Null))
}

/// What a node is, for messages.
pub(crate) fn kind(node: &Node<'_>) -> &'static str {
    match &node.data {
        YamlData::Value(Scalar::Null) => "null",
        YamlData::Value(Scalar::Boolean(_)) => "a boolean",
        YamlData::Value(Scalar::Integer(_)) => "an integer",
        YamlData::Value(Scalar::FloatingPoint(_)) => "a number",
        YamlData::Value(Scalar::String(_)) | YamlData::Representation(..) => "a string",
        YamlData::Sequence(_) => "a list",
        YamlData::Mapping(_) => "a mapping",
        YamlData::Tagged(..) => "a tagged node",
        YamlData::Alias(_) => "an alias",
        YamlData::BadValue => "an invalid value",
    }
}
