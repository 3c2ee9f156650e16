//! Kubernetes label selectors (`matchLabels`, `matchExpressions`) as Cilium evaluates them.

use std::collections::BTreeMap;

use crate::yaml::{Diag, Node, index, join};

/// Label key Cilium gives every pod: its namespace.
pub const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";

/// An endpoint's labels (keys without a `k8s:` / `any:` source prefix).
pub type Labels = BTreeMap<String, String>;

/// One requirement of a selector.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Requirement {
    /// The key has one of these values (`matchLabels` is `In` with one value).
    In(String, Vec<String>),
    /// The key is absent or has none of these values.
    NotIn(String, Vec<String>),
    /// The key is present.
    Exists(String),
    /// The key is absent.
    DoesNotExist(String),
}

impl Requirement {
    fn key(&self) -> &str {
        match self {
            Requirement::In(k, _)
            | Requirement::NotIn(k, _)
            | Requirement::Exists(k)
            | Requirement::DoesNotExist(k) => k,
        }
    }

    /// Whether every label set that includes `labels` satisfies the requirement (a service's
    /// selector: its pods carry at least these labels, and maybe others).
    fn holds_for_supersets(&self, labels: &Labels) -> bool {
        match self {
            // No pod carries a `reserved:` label: its absence is certain.
            Requirement::NotIn(k, _) | Requirement::DoesNotExist(k) if k.starts_with(RESERVED) => {
                true
            }
            Requirement::In(..) | Requirement::Exists(_) => self.matches(labels),
            // The key must be fixed to a value outside the list; absent, a pod may add it.
            Requirement::NotIn(k, values) => labels.get(k).is_some_and(|v| !values.contains(v)),
            // A pod may always carry one more label.
            Requirement::DoesNotExist(_) => false,
        }
    }

    fn matches(&self, labels: &Labels) -> bool {
        match self {
            Requirement::In(k, values) => labels.get(k).is_some_and(|v| values.contains(v)),
            Requirement::NotIn(k, values) => labels.get(k).is_none_or(|v| !values.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        }
    }
}

/// A label selector: every requirement must hold. The empty selector selects everything.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
}

impl LabelSelector {
    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Whether the selector selects every label set that includes `labels`: every pod a
    /// service with selector `labels` can pick, whatever other labels the pod has. Sound for
    /// `NotIn` and `DoesNotExist` (never true for labels a pod could add), so a service's
    /// addresses are reached only when all of its pods would be.
    pub fn selects_every(&self, labels: &Labels) -> bool {
        self.requirements
            .iter()
            .all(|r| r.holds_for_supersets(labels))
    }

    /// Whether some requirement is about `key`.
    pub fn has_key(&self, key: &str) -> bool {
        self.requirements.iter().any(|r| r.key() == key)
    }

    /// Whether some requirement's key starts with `prefix`.
    pub(crate) fn has_key_prefix(&self, prefix: &str) -> bool {
        self.requirements
            .iter()
            .any(|r| r.key().starts_with(prefix))
    }

    /// Removes the `In` requirements on `key` (matchLabels, or matchExpressions `In`).
    pub(crate) fn drop_in_requirements(&mut self, key: &str) {
        self.requirements
            .retain(|r| !matches!(r, Requirement::In(k, _) if k == key));
    }

    /// Whether some `In` requirement on `key` excludes `value`.
    pub(crate) fn requires_other_value(&self, key: &str, value: &str) -> bool {
        self.requirements.iter().any(|r| match r {
            Requirement::In(k, values) => k == key && !values.iter().any(|v| v == value),
            _ => false,
        })
    }

    /// The `reserved:` label keys the selector has requirements on (`reserved:host`, ...).
    pub fn reserved_keys(&self) -> impl Iterator<Item = &str> + '_ {
        self.requirements
            .iter()
            .map(Requirement::key)
            .filter(|k| k.starts_with(RESERVED))
    }

    /// The reserved identity the selector names, when it is exactly one `reserved:NAME: ""`
    /// label (Cilium's spelling of an entity in an endpoint selector): `NAME`.
    pub fn reserved_identity(&self) -> Option<&str> {
        match self.requirements.as_slice() {
            [Requirement::In(k, values)] if values.iter().all(String::is_empty) => {
                k.strip_prefix(RESERVED)
            }
            _ => None,
        }
    }

    /// Adds the requirement `key == value`.
    pub fn require(&mut self, key: &str, value: &str) {
        self.requirements
            .push(Requirement::In(key.to_string(), vec![value.to_string()]));
    }
}

/// The source of Cilium's reserved identities' labels (`reserved:host`, `reserved:world`, ...).
/// Policy selectors keep it in the key: no endpoint of the registry carries such a label (the
/// endpoints file refuses the source), so a requirement on it is judged as the label being
/// absent, and `toEndpoints` maps a lone `reserved:NAME` to the entity `NAME`.
pub(crate) const RESERVED: &str = "reserved:";

/// Strips Cilium's `k8s:` / `any:` label source; `None` for another source (`reserved:`, ...),
/// which the endpoints dnsfence knows never carry.
pub(crate) fn normalize_key(key: &str) -> Option<&str> {
    match key.split_once(':') {
        None => Some(key),
        Some(("k8s" | "any", rest)) => Some(rest),
        Some(_) => None,
    }
}

const SELECTOR_FIELDS: &[&str] = &["matchLabels", "matchExpressions"];
const EXPRESSION_FIELDS: &[&str] = &["key", "operator", "values"];

/// Parses a label selector; problems are reported and yield `None`.
pub(crate) fn parse(diag: &mut Diag<'_>, node: &Node<'_>, field: &str) -> Option<LabelSelector> {
    let before = diag.errors.len();
    let fields = diag.mapping(node, field, SELECTOR_FIELDS, "")?;
    let mut selector = LabelSelector::default();
    if let Some(labels) = fields.get_non_null("matchLabels") {
        let path = join(field, "matchLabels");
        for (key, value) in diag.string_map(labels, &path) {
            if let Some(key) = checked_key(diag, labels, &path, &key) {
                selector
                    .requirements
                    .push(Requirement::In(key, vec![value]));
            }
        }
    }
    if let Some(exprs) = fields.get_non_null("matchExpressions") {
        let path = join(field, "matchExpressions");
        for (i, expr) in diag
            .sequence(exprs, &path)
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            if let Some(r) = parse_expression(diag, expr, &index(&path, i)) {
                selector.requirements.push(r);
            }
        }
    }
    (diag.errors.len() == before).then_some(selector)
}

fn checked_key(diag: &mut Diag<'_>, node: &Node<'_>, field: &str, key: &str) -> Option<String> {
    if key.len() > RESERVED.len() && key.starts_with(RESERVED) {
        return Some(key.to_string());
    }
    match normalize_key(key) {
        Some(k) if !k.is_empty() => Some(k.to_string()),
        Some(_) => {
            diag.invalid(node, field, "empty label key");
            None
        }
        None => {
            diag.invalid(
                node,
                field,
                format!(
                    "label {key:?}: only k8s:, any: and reserved: label sources are \
                     supported (dnsfence endpoints carry Kubernetes-style labels only)"
                ),
            );
            None
        }
    }
}

fn parse_expression(diag: &mut Diag<'_>, node: &Node<'_>, field: &str) -> Option<Requirement> {
    let fields = diag.mapping(node, field, EXPRESSION_FIELDS, "")?;
    let Some(key_node) = fields.get("key") else {
        diag.push(
            crate::yaml::line(node),
            crate::LoadErrorKind::Missing {
                field: join(field, "key"),
            },
        );
        return None;
    };
    let key_path = join(field, "key");
    let key = diag.string(key_node, &key_path)?;
    let key = checked_key(diag, key_node, &key_path, &key)?;
    let Some(op_node) = fields.get("operator") else {
        diag.push(
            crate::yaml::line(node),
            crate::LoadErrorKind::Missing {
                field: join(field, "operator"),
            },
        );
        return None;
    };
    let op_path = join(field, "operator");
    let op = diag.string(op_node, &op_path)?;
    let values_path = join(field, "values");
    let mut values = Vec::new();
    if let Some(v) = fields.get_non_null("values") {
        for (i, item) in diag.sequence(v, &values_path)?.iter().enumerate() {
            values.push(diag.string(item, &index(&values_path, i))?);
        }
    }
    let values_node = fields.get("values").unwrap_or(node);
    match op.as_str() {
        "In" | "NotIn" if values.is_empty() => {
            diag.invalid(
                values_node,
                &values_path,
                format!("operator {op} needs at least one value"),
            );
            None
        }
        "Exists" | "DoesNotExist" if !values.is_empty() => {
            diag.invalid(
                values_node,
                &values_path,
                format!("operator {op} takes no values"),
            );
            None
        }
        "In" => Some(Requirement::In(key, values)),
        "NotIn" => Some(Requirement::NotIn(key, values)),
        "Exists" => Some(Requirement::Exists(key)),
        "DoesNotExist" => Some(Requirement::DoesNotExist(key)),
        _ => {
            diag.invalid(
                op_node,
                &op_path,
                format!("unknown operator {op:?} (expected In, NotIn, Exists or DoesNotExist)"),
            );
            None
        }
    }
}
