//! CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy documents: parsing and validation.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use dnsfence_matcher::{Pattern, PatternKind};

use crate::cidr::{Cidr, CidrBlock, Entity};
use crate::error::{LoadError, LoadErrorKind, LoadErrors};
use crate::selector::{self, LabelSelector, NAMESPACE_LABEL};
use crate::yaml::{self, Diag, Node, index, join, line};

/// The reason attached to every unsupported field of a policy.
const HINT: &str = " (dnsfence enforces toFQDNs, toEndpoints, toCIDR, toCIDRSet, toEntities, \
                     toPorts and icmps in egress, and toCIDR, toCIDRSet, toEndpoints, \
                     toEntities, toPorts and icmps in egressDeny)";

/// A top-level `description` (outside `spec`, where the schema has none; Cilium's own examples
/// put it there) is accepted and ignored, as the API server prunes it.
const DOC_FIELDS: &[&str] = &[
    "apiVersion",
    "kind",
    "metadata",
    "spec",
    "specs",
    "status",
    "description",
];
/// `labels` and `annotations` are accepted and ignored, as are the fields the API server adds
/// and a misplaced `description` (pruned by the API server, like a top-level one).
const METADATA_FIELDS: &[&str] = &[
    "name",
    "namespace",
    "labels",
    "annotations",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
    "description",
];
const SPEC_FIELDS: &[&str] = &[
    "endpointSelector",
    "description",
    "egress",
    "egressDeny",
    "ingress",
    "ingressDeny",
    "nodeSelector",
    "enableDefaultDeny",
];
const DEFAULT_DENY_FIELDS: &[&str] = &["ingress", "egress"];
const EGRESS_FIELDS: &[&str] = &[
    "toEndpoints",
    "toFQDNs",
    "toPorts",
    "toCIDR",
    "toCIDRSet",
    "toEntities",
    "icmps",
    // Accepted, never enforced: the rule allows nothing (see `parse_egress`).
    "toServices",
    "authentication",
    "auth",
];
const ICMP_RULE_FIELDS: &[&str] = &["fields"];
const ICMP_FIELDS: &[&str] = &["type", "family"];
const SERVICE_FIELDS: &[&str] = &["k8sService", "k8sServiceSelector"];
const K8S_SERVICE_FIELDS: &[&str] = &["serviceName", "namespace"];
const SERVICE_SELECTOR_FIELDS: &[&str] = &["selector", "namespace"];
const DENY_FIELDS: &[&str] = &[
    "toEndpoints",
    "toPorts",
    "icmps",
    "toCIDR",
    "toCIDRSet",
    "toEntities",
];
const CIDR_SET_FIELDS: &[&str] = &["cidr", "except"];
const PORT_RULE_FIELDS: &[&str] = &[
    "ports",
    "rules",
    // L7 / TLS: accepted, never enforced; the entry allows nothing (see `PortRule::l7`).
    "serverNames",
    "listener",
    "originatingTLS",
    "terminatingTLS",
];
const PORT_FIELDS: &[&str] = &["port", "protocol", "endPort"];
const L7_FIELDS: &[&str] = &["dns", "http", "kafka", "l7proto", "l7"];
/// What `PortRule::l7` names: port-rule fields and `rules` kinds dnsfence cannot enforce.
const UNENFORCED_L7: &[&str] = &[
    "serverNames",
    "listener",
    "originatingTLS",
    "terminatingTLS",
    "http",
    "kafka",
    "l7proto",
    "l7",
];
const NAME_FIELDS: &[&str] = &["matchName", "matchPattern"];
/// Cilium's derived labels of a pod's namespace (`io.cilium.k8s.namespace.labels.NAME`): a
/// selector on them picks namespaces, so a CNP does not confine it to its own.
const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";

/// The transport of a DNS query.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum Proto {
    /// DNS over UDP.
    Udp,
    /// DNS over TCP.
    Tcp,
}

/// The `protocol` of a `toPorts` port.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash, PartialOrd, Ord)]
pub enum PortProtocol {
    /// `TCP`.
    Tcp,
    /// `UDP`.
    Udp,
    /// `SCTP`.
    Sctp,
    /// `ANY` (the default): TCP, UDP and SCTP.
    Any,
    /// ICMP (`icmps` with `family: IPv4`): the "ports" are ICMP types.
    Icmp,
    /// ICMPv6 (`icmps` with `family: IPv6`): the "ports" are ICMPv6 types.
    Icmp6,
    /// Every protocol, ICMP included: an L3 rule without `toPorts` or `icmps`
    /// ([`PortProto::EVERY`]).
    Every,
}

impl PortProtocol {
    /// Whether this protocol covers a DNS query over `proto`.
    pub fn covers(self, proto: Proto) -> bool {
        matches!(
            (self, proto),
            (PortProtocol::Any | PortProtocol::Every, _)
                | (PortProtocol::Tcp, Proto::Tcp)
                | (PortProtocol::Udp, Proto::Udp)
        )
    }

    /// Whether this protocol covers packets of protocol `other` (`Tcp`, `Udp`, `Sctp`,
    /// `Icmp` or `Icmp6`): `ANY` is TCP, UDP and SCTP, as in Cilium.
    pub fn includes(self, other: PortProtocol) -> bool {
        self == other
            || self == PortProtocol::Every
            || (self == PortProtocol::Any
                && matches!(
                    other,
                    PortProtocol::Tcp | PortProtocol::Udp | PortProtocol::Sctp
                ))
    }

    /// Lowercase name: `tcp`, `udp`, `sctp`, `any`, `icmp`, `icmpv6`, `all`.
    pub fn as_str(self) -> &'static str {
        match self {
            PortProtocol::Tcp => "tcp",
            PortProtocol::Udp => "udp",
            PortProtocol::Sctp => "sctp",
            PortProtocol::Any => "any",
            PortProtocol::Icmp => "icmp",
            PortProtocol::Icmp6 => "icmpv6",
            PortProtocol::Every => "all",
        }
    }
}

/// A port or port range with its protocol, from `toPorts[].ports[]`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash, PartialOrd, Ord)]
pub struct PortProto {
    /// First port.
    pub port: u16,
    /// Last port (equal to `port` without `endPort`).
    pub end_port: u16,
    /// Protocol.
    pub proto: PortProtocol,
}

impl PortProto {
    /// Every port over every protocol, ICMP included (a toFQDNs rule without `toPorts`: an L3
    /// allow of the names' addresses, as in Cilium). The same as [`PortProto::EVERY`].
    pub const ALL: PortProto = PortProto::EVERY;

    /// Everything, ICMP included: what an L3 rule without `toPorts` or `icmps` allows (or an
    /// `egressDeny` without them denies) in the L3 table.
    pub const EVERY: PortProto = PortProto {
        port: 0,
        end_port: u16::MAX,
        proto: PortProtocol::Every,
    };

    /// An ICMP (`v6` false) or ICMPv6 type.
    pub fn icmp(v6: bool, icmp_type: u8) -> PortProto {
        PortProto {
            port: u16::from(icmp_type),
            end_port: u16::from(icmp_type),
            proto: if v6 {
                PortProtocol::Icmp6
            } else {
                PortProtocol::Icmp
            },
        }
    }

    /// Whether this entry covers `port` over `proto`.
    pub fn covers(&self, port: u16, proto: Proto) -> bool {
        (self.port..=self.end_port).contains(&port) && self.proto.covers(proto)
    }
}

impl fmt::Display for PortProto {
    /// `443/tcp`, or `8000-8080/tcp` for a range.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.end_port == self.port {
            write!(f, "{}/{}", self.port, self.proto.as_str())
        } else {
            write!(f, "{}-{}/{}", self.port, self.end_port, self.proto.as_str())
        }
    }
}

/// Which kind of policy.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum PolicyKind {
    /// `CiliumNetworkPolicy`: confined to its namespace.
    Namespaced,
    /// `CiliumClusterwideNetworkPolicy`.
    Clusterwide,
}

impl PolicyKind {
    /// The Kubernetes kind.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::Namespaced => "CiliumNetworkPolicy",
            PolicyKind::Clusterwide => "CiliumClusterwideNetworkPolicy",
        }
    }
}

/// One validated policy document.
#[derive(Debug, Clone)]
pub struct Policy {
    /// CNP or CCNP.
    pub kind: PolicyKind,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace` (default `default`) of a CNP; `None` for a CCNP.
    pub namespace: Option<String>,
    /// The file it came from.
    pub file: PathBuf,
    /// The line its document starts at.
    pub line: usize,
    /// `spec` followed by `specs[]`.
    pub specs: Vec<Spec>,
    /// What the document holds that dnsfence accepts but does not enforce (`ingress`, host
    /// policies), as (line, text): reported, never silently widened.
    pub notes: Vec<(usize, String)>,
}

/// One rule (`spec` or an item of `specs`).
#[derive(Debug, Clone)]
pub struct Spec {
    /// `endpointSelector`, with a CNP's namespace already required.
    pub selector: LabelSelector,
    /// `egress[]`.
    pub egress: Vec<EgressRule>,
    /// `egressDeny[]`: what is denied whatever the allow rules say.
    pub egress_deny: Vec<L3Rule>,
    /// `enableDefaultDeny.egress` when the spec sets it.
    pub egress_default_deny: Option<bool>,
}

impl Spec {
    /// Whether the spec has egress rules (allow or deny).
    fn has_egress_rules(&self) -> bool {
        !self.egress.is_empty() || !self.egress_deny.is_empty()
    }

    /// Whether the spec puts the endpoints it selects under egress default-deny. Cilium: the
    /// spec's `enableDefaultDeny.egress` when set, else whether it has egress rules, deny rules
    /// included (`egress: [{}]` denies all egress). An endpoint is under default deny when any
    /// spec selecting it asks for it.
    pub fn enforces_egress(&self) -> bool {
        self.egress_default_deny
            .unwrap_or_else(|| self.has_egress_rules())
    }

    /// Whether the spec matters for egress at all: it asks for default deny, or it has rules
    /// (with `enableDefaultDeny.egress: false`, its allows add nothing to a default-allow
    /// endpoint, but its `egressDeny` and DNS rules still restrict it).
    pub fn concerns_egress(&self) -> bool {
        self.enforces_egress() || self.has_egress_rules()
    }
}

/// One item of `egress`.
#[derive(Debug, Clone)]
pub enum EgressRule {
    /// `{}`: allows nothing (but selects the endpoint for egress enforcement).
    Nothing,
    /// `toFQDNs` (L3/L4 layer), with the ports it opens.
    Fqdn(FqdnRule),
    /// `toPorts` with `rules.dns` (DNS layer), optionally restricted by `toEndpoints`.
    Dns(DnsRule),
    /// An L3/L4 allow: `toCIDR` / `toCIDRSet` / `toEndpoints` (without DNS rules), or
    /// `toPorts` alone (every destination on those ports).
    L3(L3Rule),
}

/// Where an L3 rule applies.
#[derive(Debug, Clone)]
pub enum L3Target {
    /// No L3 selector (`toPorts` only): every destination.
    Any,
    /// `toCIDR` / `toCIDRSet`.
    Cidrs(Vec<CidrBlock>),
    /// `toEndpoints`: the addresses of the registered endpoints they select.
    Endpoints(Vec<LabelSelector>),
    /// `toEntities`.
    Entities(Vec<Entity>),
    /// `toServices`: the addresses (ClusterIPs and backends) of the registry's services they
    /// name; a service the registry does not know allows nothing.
    Services(Vec<ServiceRef>),
}

impl ServiceRef {
    /// Whether it names `svc`.
    pub fn names(&self, svc: &crate::Service) -> bool {
        let in_namespace = |ns: &Option<String>| ns.as_ref().is_none_or(|ns| *ns == svc.namespace);
        match self {
            ServiceRef::Named { namespace, name } => in_namespace(namespace) && *name == svc.name,
            ServiceRef::Selector {
                namespace,
                selector,
            } => in_namespace(namespace) && selector.matches(&svc.labels),
        }
    }
}

/// One `toServices` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceRef {
    /// `k8sService`: a service by name, in `namespace` (a CNP's own by default; `None`: a
    /// CCNP's, any namespace).
    Named {
        /// `namespace`.
        namespace: Option<String>,
        /// `serviceName`.
        name: String,
    },
    /// `k8sServiceSelector`: the services whose own labels `selector` matches, in
    /// `namespace` (as for `Named`).
    Selector {
        /// `namespace`.
        namespace: Option<String>,
        /// `selector`.
        selector: LabelSelector,
    },
}

/// An L3/L4 rule (allow in `egress`, deny in `egressDeny`).
#[derive(Debug, Clone)]
pub struct L3Rule {
    /// The destinations.
    pub to: L3Target,
    /// The ports; empty = all ports.
    pub ports: Vec<PortProto>,
}

/// A `toFQDNs` rule.
#[derive(Debug, Clone)]
pub struct FqdnRule {
    /// The `matchName` / `matchPattern` selectors.
    pub selectors: Vec<Pattern>,
    /// Ports opened to the resolved addresses; empty = all ports.
    pub ports: Vec<PortProto>,
}

/// A DNS-layer rule.
#[derive(Debug, Clone)]
pub struct DnsRule {
    /// The DNS servers it applies to: `toEndpoints` (a CNP's namespace added where they name
    /// none), `toCIDR`/`toCIDRSet` or `toEntities`; `None` = any destination.
    pub to: Option<L3Target>,
    /// The `toPorts` entries, each with `rules.dns`.
    pub ports: Vec<DnsPorts>,
}

/// One `toPorts` entry of a DNS-layer rule.
#[derive(Debug, Clone)]
pub struct DnsPorts {
    /// The ports the rule covers.
    pub ports: Vec<PortProto>,
    /// `rules.dns[]`; empty (`dns: []`) allows every name.
    pub names: Vec<Pattern>,
}

/// Counts of a loaded policy set, for `dnsfence policy validate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Summary {
    /// Files read.
    pub files: usize,
    /// Policy documents.
    pub policies: usize,
    /// Egress rules.
    pub rules: usize,
    /// `matchName` / `matchPattern` entries (DNS and toFQDNs).
    pub patterns: usize,
}

/// Every policy of a load, validated.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    /// The policies, in file and document order.
    pub policies: Vec<Policy>,
    /// The files read, in order.
    pub files: Vec<PathBuf>,
}

impl PolicySet {
    /// What the policies hold that dnsfence accepts but does not enforce, as
    /// `FILE:LINE: text` lines (see [`Policy::notes`]).
    pub fn notes(&self) -> Vec<String> {
        self.policies
            .iter()
            .flat_map(|p| {
                p.notes
                    .iter()
                    .map(move |(line, text)| format!("{}:{line}: note: {text}", p.file.display()))
            })
            .collect()
    }

    /// Loads policy files and directories. A directory contributes its `*.yaml` / `*.yml`
    /// files sorted by name, not recursively; names starting with `.` are skipped (so a mounted
    /// ConfigMap's `..data` is not read twice). All problems are collected.
    pub fn load(paths: &[PathBuf]) -> Result<PolicySet, LoadErrors> {
        let mut errors = Vec::new();
        let mut set = PolicySet::default();
        for file in expand_paths(paths, &mut errors) {
            match std::fs::read_to_string(&file) {
                Ok(text) => set.parse_file(&file, &text, &mut errors),
                Err(e) => errors.push(LoadError::new(&file, 0, LoadErrorKind::Io(e.to_string()))),
            }
        }
        set.check_duplicates(&mut errors);
        if errors.is_empty() {
            Ok(set)
        } else {
            Err(LoadErrors(errors))
        }
    }

    /// Parses `text` as if read from `file` (for tests and in-memory sources).
    pub fn from_yaml(file: &Path, text: &str) -> Result<PolicySet, LoadErrors> {
        let mut errors = Vec::new();
        let mut set = PolicySet::default();
        set.parse_file(file, text, &mut errors);
        set.check_duplicates(&mut errors);
        if errors.is_empty() {
            Ok(set)
        } else {
            Err(LoadErrors(errors))
        }
    }

    /// Counts for a one-line summary.
    pub fn summary(&self) -> Summary {
        let mut s = Summary {
            files: self.files.len(),
            policies: self.policies.len(),
            ..Summary::default()
        };
        for rule in self
            .policies
            .iter()
            .flat_map(|p| &p.specs)
            .flat_map(|s| &s.egress)
        {
            s.rules += 1;
            s.patterns += match rule {
                EgressRule::Nothing => 0,
                EgressRule::Fqdn(r) => r.selectors.len(),
                EgressRule::Dns(r) => r.ports.iter().map(|p| p.names.len()).sum(),
                EgressRule::L3(_) => 0,
            };
        }
        s
    }

    fn parse_file(&mut self, file: &Path, text: &str, errors: &mut Vec<LoadError>) {
        self.files.push(file.to_path_buf());
        if let Some(empty) = empty_file(file, text) {
            errors.push(empty);
            return;
        }
        let first_error = errors.len();
        let mut diag = Diag { file, errors };
        for doc in yaml::parse_documents(&mut diag, text) {
            if yaml::is_null(&doc) {
                continue; // an empty document (`---` at the end of a file)
            }
            if let Some(policy) = parse_policy(&mut diag, &doc) {
                self.policies.push(policy);
            }
        }
        // Report in line order (a stable sort keeps the order of errors on one line).
        errors[first_error..].sort_by_key(|e| e.line);
    }

    fn check_duplicates(&self, errors: &mut Vec<LoadError>) {
        errors.extend(self.duplicates().into_iter().map(|(_, e)| e));
    }

    /// Removes every policy that repeats the kind, namespace and name of an earlier one, and
    /// returns each with the error that reports it.
    pub fn remove_duplicates(&mut self) -> Vec<(Policy, LoadError)> {
        let found = self.duplicates();
        let mut removed = Vec::with_capacity(found.len());
        for (i, error) in found.into_iter().rev() {
            removed.push((self.policies.remove(i), error));
        }
        removed.reverse();
        removed
    }

    /// Index and error of each policy that repeats an earlier one's kind, namespace and name.
    fn duplicates(&self) -> Vec<(usize, LoadError)> {
        let mut out = Vec::new();
        let mut seen: HashMap<(PolicyKind, Option<&str>, &str), &Policy> = HashMap::new();
        for (i, p) in self.policies.iter().enumerate() {
            let key = (p.kind, p.namespace.as_deref(), p.name.as_str());
            if let Some(first) = seen.get(&key) {
                let ns = p
                    .namespace
                    .as_deref()
                    .map(|ns| format!("{ns}/"))
                    .unwrap_or_default();
                out.push((
                    i,
                    LoadError::new(
                        &p.file,
                        p.line,
                        LoadErrorKind::Invalid {
                            field: "metadata.name".to_string(),
                            reason: format!(
                                "duplicate {} {ns}{} (first at {}:{})",
                                p.kind.as_str(),
                                p.name,
                                first.file.display(),
                                first.line
                            ),
                        },
                    ),
                ));
            } else {
                seen.insert(key, p);
            }
        }
        out
    }
}

/// The error of a file that holds nothing at all (see [`LoadErrorKind::Empty`]).
pub(crate) fn empty_file(file: &Path, text: &str) -> Option<LoadError> {
    text.trim()
        .is_empty()
        .then(|| LoadError::new(file, 0, LoadErrorKind::Empty))
}

/// What one policy file yields on its own: hot reload weighs each file separately, so that a
/// bad file harms only the endpoints it concerns.
#[derive(Debug, Clone)]
pub enum FileVerdict {
    /// Every document validated. No document at all (a file of comments) is an explicit
    /// "no policy".
    Valid(Vec<Policy>),
    /// Some documents failed, and every endpoint selector of each failed document could still
    /// be read: the valid documents apply, and the endpoints the failed ones select are denied
    /// everything (`fail_closed`).
    Partial {
        /// The documents that validated.
        policies: Vec<Policy>,
        /// One selector per spec of each failed document (a CNP's namespace required).
        fail_closed: Vec<LabelSelector>,
        /// What is wrong.
        errors: LoadErrors,
    },
    /// The file cannot be used at all: empty, not YAML (a truncated or half-written file
    /// usually is not), or a failed document whose selectors cannot be read.
    Unusable {
        /// The endpoints the file could concern: one selector per namespace its documents
        /// name when every document names one (CNPs), else the empty selector (every endpoint).
        scope: Vec<LabelSelector>,
        /// What is wrong.
        errors: LoadErrors,
    },
}

/// Validates one policy file's text on its own (see [`FileVerdict`]).
pub fn parse_policy_file(file: &Path, text: &str) -> FileVerdict {
    let everything = || vec![LabelSelector::default()];
    if let Some(empty) = empty_file(file, text) {
        return FileVerdict::Unusable {
            scope: everything(),
            errors: LoadErrors(vec![empty]),
        };
    }
    let mut errors = Vec::new();
    let mut diag = Diag {
        file,
        errors: &mut errors,
    };
    let docs = yaml::parse_documents(&mut diag, text);
    if !diag.errors.is_empty() {
        return FileVerdict::Unusable {
            scope: everything(),
            errors: LoadErrors(errors),
        };
    }
    let docs: Vec<_> = docs.into_iter().filter(|d| !yaml::is_null(d)).collect();
    let mut policies = Vec::new();
    let mut fail_closed = Vec::new();
    let mut unreadable = false;
    for doc in &docs {
        match parse_policy(&mut diag, doc) {
            Some(policy) => policies.push(policy),
            None => match selectors_of(file, doc) {
                Some(selectors) => fail_closed.extend(selectors),
                None => unreadable = true,
            },
        }
    }
    errors.sort_by_key(|e| e.line);
    let errors = LoadErrors(errors);
    if unreadable {
        let scope = docs
            .iter()
            .map(|doc| namespace_of(file, doc).map(|ns| namespace_selector(&ns)))
            .collect::<Option<Vec<_>>>()
            .unwrap_or_else(everything);
        FileVerdict::Unusable { scope, errors }
    } else if errors.is_empty() {
        FileVerdict::Valid(policies)
    } else {
        FileVerdict::Partial {
            policies,
            fail_closed,
            errors,
        }
    }
}

/// The selector of every endpoint of namespace `ns`.
fn namespace_selector(ns: &str) -> LabelSelector {
    let mut s = LabelSelector::default();
    s.require(NAMESPACE_LABEL, ns);
    s
}

/// The kind of a failed document and, for a CNP, its namespace: `default` when its metadata
/// names none, `None` when it has no metadata mapping (a document cut short may have lost
/// it); `None` overall when the kind or a namespace it names cannot be read.
fn kind_and_namespace(file: &Path, doc: &Node<'_>) -> Option<(PolicyKind, Option<String>)> {
    let kind = match doc.data.as_mapping_get("kind").and_then(yaml::scalar_str) {
        Some("CiliumNetworkPolicy") => PolicyKind::Namespaced,
        Some("CiliumClusterwideNetworkPolicy") => PolicyKind::Clusterwide,
        _ => return None,
    };
    if kind == PolicyKind::Clusterwide {
        return Some((kind, None));
    }
    let mut scratch = Vec::new();
    let mut diag = Diag {
        file,
        errors: &mut scratch,
    };
    let ns = match doc.data.as_mapping_get("metadata") {
        Some(meta) if meta.data.as_mapping().is_some() => {
            match meta.data.as_mapping_get("namespace") {
                None => Some("default".to_string()),
                Some(n) if yaml::is_null(n) => Some("default".to_string()),
                Some(n) => Some(diag.string(n, "metadata.namespace")?),
            }
        }
        _ => None,
    };
    scratch.is_empty().then_some((kind, ns))
}

/// The namespace a failed document is confined to: a CNP's; `None` for a CCNP or a document
/// whose kind or namespace cannot be read.
fn namespace_of(file: &Path, doc: &Node<'_>) -> Option<String> {
    kind_and_namespace(file, doc)?.1
}

/// The endpoint selectors of a document that failed validation (one per spec, a CNP's
/// namespace required when it can be read; else in every namespace), when every one of them
/// can still be read.
fn selectors_of(file: &Path, doc: &Node<'_>) -> Option<Vec<LabelSelector>> {
    let (_, namespace) = kind_and_namespace(file, doc)?;
    let mut specs: Vec<&Node<'_>> = Vec::new();
    if let Some(spec) = doc
        .data
        .as_mapping_get("spec")
        .filter(|n| !yaml::is_null(n))
    {
        specs.push(spec);
    }
    if let Some(list) = doc
        .data
        .as_mapping_get("specs")
        .filter(|n| !yaml::is_null(n))
    {
        specs.extend(list.data.as_sequence()?.iter());
    }
    if specs.is_empty() {
        return None;
    }
    let mut scratch = Vec::new();
    let mut diag = Diag {
        file,
        errors: &mut scratch,
    };
    let mut out = Vec::with_capacity(specs.len());
    for spec in specs {
        let node = spec.data.as_mapping_get("endpointSelector")?;
        let mut selector = selector::parse(&mut diag, node, "endpointSelector")?;
        if let Some(ns) = &namespace {
            if selector.requires_other_value(NAMESPACE_LABEL, ns) {
                return None;
            }
            selector.require(NAMESPACE_LABEL, ns);
        }
        out.push(selector);
    }
    scratch.is_empty().then_some(out)
}

/// Files named by `paths`, directories expanded (sorted, non-recursive, `*.yaml` / `*.yml`).
pub(crate) fn expand_paths(paths: &[PathBuf], errors: &mut Vec<LoadError>) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for path in paths {
        if !path.is_dir() {
            files.push(path.clone());
            continue;
        }
        let entries = match std::fs::read_dir(path) {
            Ok(entries) => entries,
            Err(e) => {
                errors.push(LoadError::new(path, 0, LoadErrorKind::Io(e.to_string())));
                continue;
            }
        };
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                !name.starts_with('.')
                    && (name.ends_with(".yaml") || name.ends_with(".yml"))
                    && p.is_file()
            })
            .collect();
        if found.is_empty() {
            errors.push(LoadError::new(path, 0, LoadErrorKind::EmptyDirectory));
        }
        found.sort();
        files.extend(found);
    }
    files
}

fn missing(diag: &mut Diag<'_>, at: &Node<'_>, field: String) {
    diag.push(line(at), LoadErrorKind::Missing { field });
}

fn parse_policy(diag: &mut Diag<'_>, doc: &Node<'_>) -> Option<Policy> {
    let before = diag.errors.len();
    // apiVersion and kind first: a document of another kind gets one error, not one per field.
    let (api, kind) = match &doc.data {
        saphyr::YamlData::Mapping(_) => (
            doc.data.as_mapping_get("apiVersion"),
            doc.data.as_mapping_get("kind"),
        ),
        _ => {
            diag.invalid(
                doc,
                "",
                format!(
                    "expected a policy document (a mapping), found {}",
                    yaml::kind(doc)
                ),
            );
            return None;
        }
    };
    match api {
        None => missing(diag, doc, "apiVersion".into()),
        Some(v) => {
            if let Some(api) = diag.string(v, "apiVersion")
                && api != "cilium.io/v2"
            {
                diag.invalid(
                    v,
                    "apiVersion",
                    format!("{api:?}: expected \"cilium.io/v2\""),
                );
            }
        }
    }
    let kind = match kind {
        None => {
            missing(diag, doc, "kind".into());
            None
        }
        Some(v) => match diag.string(v, "kind").as_deref() {
            Some("CiliumNetworkPolicy") => Some(PolicyKind::Namespaced),
            Some("CiliumClusterwideNetworkPolicy") => Some(PolicyKind::Clusterwide),
            Some(other) => {
                diag.invalid(
                    v,
                    "kind",
                    format!(
                        "{other:?}: expected CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy"
                    ),
                );
                None
            }
            None => None,
        },
    };
    if diag.errors.len() != before {
        return None;
    }
    let kind = kind?;
    let fields = diag.mapping(doc, "", DOC_FIELDS, "")?;
    let Some(meta) = fields.get("metadata") else {
        missing(diag, doc, "metadata".into());
        return None;
    };
    let meta_node = meta;
    let meta = diag.mapping(meta, "metadata", METADATA_FIELDS, "")?;
    let name = match meta.get("name") {
        Some(n) => diag.string(n, "metadata.name"),
        None => {
            missing(diag, meta_node, "metadata.name".into());
            None
        }
    };
    let namespace = match (kind, meta.get_non_null("namespace")) {
        (PolicyKind::Namespaced, None) => Some("default".to_string()),
        // Kubernetes puts an object with an empty namespace in the request's namespace; in
        // a file that is `default`, as when the field is absent (review: `""` selected no
        // endpoint, so the policy silently enforced nothing).
        (PolicyKind::Namespaced, Some(ns)) => diag
            .string(ns, "metadata.namespace")
            .map(|n| if n.is_empty() { "default".into() } else { n }),
        (PolicyKind::Clusterwide, None) => None,
        // Kubernetes reads an empty namespace as none.
        (PolicyKind::Clusterwide, Some(ns)) if ns.data.as_str() == Some("") => None,
        (PolicyKind::Clusterwide, Some(ns)) => {
            diag.invalid(
                ns,
                "metadata.namespace",
                "a CiliumClusterwideNetworkPolicy is not namespaced",
            );
            None
        }
    };
    let mut specs = Vec::new();
    let mut notes = Vec::new();
    let spec = fields.get_non_null("spec");
    let list = fields.get_non_null("specs");
    if spec.is_none() && list.is_none() {
        missing(diag, doc, "spec".into());
    }
    if let Some(spec) = spec
        && let Some(s) = parse_spec(
            diag,
            spec,
            fields.key("spec").unwrap_or(spec),
            "spec",
            namespace.as_deref(),
            &mut notes,
        )
    {
        specs.push(s);
    }
    if let Some(list) = list {
        for (i, item) in diag
            .sequence(list, "specs")
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let path = index("specs", i);
            if let Some(s) = parse_spec(diag, item, item, &path, namespace.as_deref(), &mut notes) {
                specs.push(s);
            }
        }
    }
    if diag.errors.len() != before {
        return None;
    }
    notes.sort_by_key(|&(line, _)| line);
    Some(Policy {
        kind,
        name: name?,
        namespace,
        file: diag.file.to_path_buf(),
        line: line(doc),
        specs,
        notes,
    })
}

fn parse_spec(
    diag: &mut Diag<'_>,
    node: &Node<'_>,
    at: &Node<'_>,
    path: &str,
    namespace: Option<&str>,
    notes: &mut Vec<(usize, String)>,
) -> Option<Spec> {
    let before = diag.errors.len();
    let fields = diag.mapping(node, path, SPEC_FIELDS, HINT)?;
    if let Some(d) = fields.get_non_null("description") {
        diag.string(d, &join(path, "description"));
    }
    for field in ["ingress", "ingressDeny"] {
        if let Some(key) = fields.key(field) {
            notes.push((
                line(key),
                format!(
                    "{}: not enforced: dnsfence enforces egress only (ingress is the CNI's job)",
                    join(path, field)
                ),
            ));
        }
    }
    if let Some(key) = fields.key("nodeSelector") {
        if fields.get("endpointSelector").is_some() {
            diag.invalid(
                key,
                &join(path, "nodeSelector"),
                "a spec has either endpointSelector or nodeSelector",
            );
            return None;
        }
        // A host policy selects nodes, not workloads: nothing of it applies to endpoints.
        notes.push((
            line(key),
            format!(
                "{}: a host policy: not enforced by dnsfence (it selects nodes, not workloads)",
                join(path, "nodeSelector")
            ),
        ));
        return None;
    }
    let sel_path = join(path, "endpointSelector");
    let selector = match fields.get("endpointSelector") {
        None => {
            missing(diag, at, sel_path);
            None
        }
        Some(sel) => selector::parse(diag, sel, &sel_path).map(|mut s| {
            note_reserved(&s, sel, &sel_path, notes);
            if let Some(ns) = namespace {
                if s.requires_other_value(NAMESPACE_LABEL, ns) {
                    // Cilium removes such a match ("EndpointSelector always applies in
                    // namespace of the policy resource, removing illegal namespace match")
                    // and enforces the policy in its own namespace: so does dnsfence.
                    notes.push((
                        line(sel),
                        format!(
                            "{sel_path}: names another namespace than the policy's own; a \
                             CiliumNetworkPolicy only selects endpoints of its namespace, so \
                             that match is replaced by {NAMESPACE_LABEL}={ns}, as Cilium does"
                        ),
                    ));
                    s.drop_in_requirements(NAMESPACE_LABEL);
                }
                s.require(NAMESPACE_LABEL, ns);
            }
            s
        }),
    };
    let egress_default_deny = fields
        .get_non_null("enableDefaultDeny")
        .and_then(|n| parse_default_deny(diag, n, &join(path, "enableDefaultDeny")));
    let default_allow = egress_default_deny == Some(false);
    let mut egress = Vec::new();
    if let Some(list) = fields.get_non_null("egress") {
        let egress_path = join(path, "egress");
        for (i, item) in diag
            .sequence(list, &egress_path)
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let at = index(&egress_path, i);
            if let Some(rules) = parse_egress(diag, item, &at, namespace, default_allow, notes) {
                egress.extend(rules);
            }
        }
    }
    let mut egress_deny = Vec::new();
    if let Some(list) = fields.get_non_null("egressDeny") {
        let deny_path = join(path, "egressDeny");
        for (i, item) in diag
            .sequence(list, &deny_path)
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let at = index(&deny_path, i);
            if let Some(rule) = parse_deny(diag, item, &at, namespace, notes) {
                egress_deny.push(rule);
            }
        }
    }
    if diag.errors.len() != before {
        return None;
    }
    Some(Spec {
        selector: selector?,
        egress,
        egress_deny,
        egress_default_deny,
    })
}

/// `enableDefaultDeny`: `{ingress: bool, egress: bool}`; returns `egress` when set (ingress is
/// not enforced by dnsfence, so its value only has to be a boolean).
fn parse_default_deny(diag: &mut Diag<'_>, node: &Node<'_>, path: &str) -> Option<bool> {
    let fields = diag.mapping(node, path, DEFAULT_DENY_FIELDS, "")?;
    let mut egress = None;
    for key in DEFAULT_DENY_FIELDS {
        let Some(value) = fields.get_non_null(key) else {
            continue;
        };
        match &value.data {
            saphyr::YamlData::Value(saphyr::Scalar::Boolean(b)) => {
                if *key == "egress" {
                    egress = Some(*b);
                }
            }
            _ => diag.invalid(
                value,
                &join(path, key),
                format!("expected true or false, found {}", yaml::kind(value)),
            ),
        }
    }
    egress
}

/// A parsed `toPorts` entry before the rule is classified.
struct PortRule<'n, 'a> {
    node: &'n Node<'a>,
    /// The `rules` key, when present.
    rules_key: Option<&'n Node<'a>>,
    path: String,
    ports: Vec<PortProto>,
    /// `rules.dns`: `Some(empty)` for `dns: []`.
    dns: Option<Vec<Pattern>>,
    /// The L7/TLS part dnsfence cannot enforce (`rules.http`, `serverNames`, ...), with its
    /// line: the entry then allows nothing (its traffic stays denied), and a note says so.
    l7: Option<(usize, String)>,
}

/// `toEndpoints` selectors (a CNP's namespace added where they name none). A lone
/// `reserved:NAME` label selects the entity `NAME` (as in Cilium); other `reserved:` labels
/// get a note.
fn parse_to_endpoints(
    diag: &mut Diag<'_>,
    list: &Node<'_>,
    path: &str,
    namespace: Option<&str>,
    notes: &mut Vec<(usize, String)>,
) -> Vec<LabelSelector> {
    let list_path = join(path, "toEndpoints");
    let mut out = Vec::new();
    let items = diag.sequence(list, &list_path).unwrap_or_default();
    if items.is_empty() && !yaml::is_null(list) {
        diag.invalid(list, &list_path, "empty list (use [{}] for every endpoint)");
    }
    for (i, item) in items.iter().enumerate() {
        let at = index(&list_path, i);
        if let Some(mut sel) = selector::parse(diag, item, &at) {
            if let Some(name) = sel.reserved_identity() {
                let why = match Entity::reserved(name) {
                    Some(Entity::Unknown) => Some("an identity dnsfence cannot tell"),
                    Some(_) => None,
                    None => Some("no reserved identity dnsfence knows"),
                };
                if let Some(why) = why {
                    notes.push((
                        line(item),
                        format!(
                            "{at}: reserved:{name} is {why}: it allows nothing here (fail closed)"
                        ),
                    ));
                }
                // An entity: no namespace to confine it to.
                out.push(sel);
                continue;
            }
            note_reserved(&sel, item, &at, notes);
            // Cilium (`getEndpointSelector`): a CNP's peer selectors are confined to its
            // namespace unless they name a namespace themselves, select by namespace labels
            // (`io.cilium.k8s.namespace.labels.*`), or have a `reserved:` requirement.
            if let Some(ns) = namespace
                && !sel.has_key(NAMESPACE_LABEL)
                && !sel.has_key_prefix(NAMESPACE_LABELS_PREFIX)
                && sel.reserved_keys().next().is_none()
            {
                sel.require(NAMESPACE_LABEL, ns);
            }
            out.push(sel);
        }
    }
    out
}

/// A note for a selector with `reserved:` requirements that does not name one identity: no
/// registered endpoint carries such a label, so each is judged as the label being absent.
fn note_reserved(sel: &LabelSelector, item: &Node<'_>, at: &str, notes: &mut Vec<(usize, String)>) {
    if let Some(key) = sel.reserved_keys().next() {
        notes.push((
            line(item),
            format!(
                "{at}: {key}: dnsfence endpoints carry no reserved: labels, so this \
                 requirement is judged as the label being absent"
            ),
        ));
    }
}

/// `toCIDR` and `toCIDRSet` of a rule, as blocks (None when the rule has neither).
fn parse_cidrs(
    diag: &mut Diag<'_>,
    fields: &yaml::Fields<'_, '_>,
    path: &str,
) -> Option<Vec<CidrBlock>> {
    let (plain, set) = (fields.get("toCIDR"), fields.get("toCIDRSet"));
    if plain.is_none() && set.is_none() {
        return None;
    }
    let mut blocks = Vec::new();
    let prefix = |diag: &mut Diag<'_>, node: &Node<'_>, at: &str| -> Option<Cidr> {
        let text = diag.string(node, at)?;
        let addr = text.trim().split('/').next().unwrap_or_default();
        if let Ok(std::net::IpAddr::V6(v6)) = addr.parse::<std::net::IpAddr>()
            && v6.to_ipv4_mapped().is_some()
        {
            // Cilium matches such a prefix against IPv6 destinations only (IPv4 traffic
            // never does); dnsfence judges mapped destinations as IPv4, so it would open
            // IPv4 (`::ffff:0:0/96` every address). Refused: write the IPv4 prefix.
            diag.invalid(
                node,
                at,
                format!("{text:?} is an IPv4-mapped IPv6 prefix: write the IPv4 prefix"),
            );
            return None;
        }
        match Cidr::parse(text.trim()) {
            Ok(c) => Some(c),
            Err(e) => {
                diag.invalid(node, at, e);
                None
            }
        }
    };
    if let Some(list) = plain {
        let list_path = join(path, "toCIDR");
        let items = diag.non_empty_sequence(list, &list_path);
        for (i, item) in items.iter().enumerate() {
            if let Some(cidr) = prefix(diag, item, &index(&list_path, i)) {
                blocks.push(CidrBlock::new(cidr));
            }
        }
    }
    if let Some(list) = set {
        let list_path = join(path, "toCIDRSet");
        let items = diag.non_empty_sequence(list, &list_path);
        for (i, item) in items.iter().enumerate() {
            let item_path = index(&list_path, i);
            let Some(f) = diag.mapping(item, &item_path, CIDR_SET_FIELDS, HINT) else {
                continue;
            };
            let Some(cidr_node) = f.get("cidr") else {
                missing(diag, item, join(&item_path, "cidr"));
                continue;
            };
            let Some(cidr) = prefix(diag, cidr_node, &join(&item_path, "cidr")) else {
                continue;
            };
            let mut except = Vec::new();
            if let Some(ex) = f.get_non_null("except") {
                let ex_path = join(&item_path, "except");
                for (j, e) in diag
                    .sequence(ex, &ex_path)
                    .unwrap_or_default()
                    .iter()
                    .enumerate()
                {
                    let at = index(&ex_path, j);
                    if let Some(e_cidr) = prefix(diag, e, &at) {
                        if !cidr.contains(&e_cidr) {
                            diag.invalid(e, &at, format!("{e_cidr} is not inside {cidr}"));
                            continue;
                        }
                        except.push(e_cidr);
                    }
                }
            }
            blocks.push(CidrBlock {
                except,
                ..CidrBlock::new(cidr)
            });
        }
    }
    Some(blocks)
}

/// `icmps` of a rule as ICMP / ICMPv6 type entries (None when absent). Cilium refuses
/// `icmps` beside `toPorts` in one rule; so does dnsfence.
fn parse_icmps(
    diag: &mut Diag<'_>,
    fields: &yaml::Fields<'_, '_>,
    node: &Node<'_>,
    path: &str,
) -> Option<Vec<PortProto>> {
    use saphyr::{Scalar, YamlData};
    let list = fields.get("icmps")?;
    let list_path = join(path, "icmps");
    if fields.get_non_null("toPorts").is_some() {
        diag.invalid(
            node,
            path,
            "icmps and toPorts cannot be combined in one rule (Cilium refuses it too): use \
             two rules",
        );
    }
    let mut out = Vec::new();
    for (i, rule) in diag.non_empty_sequence(list, &list_path).iter().enumerate() {
        let rule_path = index(&list_path, i);
        let Some(rf) = diag.mapping(rule, &rule_path, ICMP_RULE_FIELDS, "") else {
            continue;
        };
        let fields_path = join(&rule_path, "fields");
        let Some(items) = rf.get("fields") else {
            missing(diag, rule, fields_path);
            continue;
        };
        for (j, item) in diag
            .non_empty_sequence(items, &fields_path)
            .iter()
            .enumerate()
        {
            let at = index(&fields_path, j);
            let Some(f) = diag.mapping(item, &at, ICMP_FIELDS, "") else {
                continue;
            };
            let v6 = match f.get_non_null("family") {
                None => false,
                Some(n) => match diag.string(n, &join(&at, "family")).as_deref() {
                    Some("IPv4") => false,
                    Some("IPv6") => true,
                    Some(other) => {
                        diag.invalid(
                            n,
                            &join(&at, "family"),
                            format!("unknown family {other:?} (expected IPv4 or IPv6)"),
                        );
                        continue;
                    }
                    None => continue,
                },
            };
            let type_path = join(&at, "type");
            let Some(t) = f.get("type") else {
                missing(diag, item, type_path);
                continue;
            };
            let number = match &t.data {
                YamlData::Value(Scalar::Integer(n)) => u8::try_from(*n).ok(),
                YamlData::Value(Scalar::String(s)) if s.bytes().all(|b| b.is_ascii_digit()) => {
                    s.parse::<u8>().ok()
                }
                YamlData::Value(Scalar::String(s)) => icmp_type_named(v6, s),
                _ => None,
            };
            match number {
                Some(n) => out.push(PortProto::icmp(v6, n)),
                None => diag.invalid(
                    t,
                    &type_path,
                    if v6 {
                        "expected an ICMPv6 type: a number 0-255 or one of Cilium's IPv6 type \
                         names (e.g. EchoRequest, NeighborSolicitation)"
                    } else {
                        "expected an ICMP type: a number 0-255 or one of Cilium's IPv4 type \
                         names (e.g. EchoRequest, DestinationUnreachable)"
                    },
                ),
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    Some(out)
}

/// The type number of an ICMP (`v6` false) or ICMPv6 type name as Cilium's `icmps` accept it
/// (CamelCase; the numbers are IANA's). None for a name Cilium does not know in that family.
fn icmp_type_named(v6: bool, name: &str) -> Option<u8> {
    const V4: &[(&str, u8)] = &[
        ("EchoReply", 0),
        ("DestinationUnreachable", 3),
        ("Redirect", 5),
        ("Echo", 8),
        ("EchoRequest", 8),
        ("RouterAdvertisement", 9),
        ("RouterSelection", 10),
        ("TimeExceeded", 11),
        ("ParameterProblem", 12),
        ("Timestamp", 13),
        ("TimestampReply", 14),
        ("Photuris", 40),
        ("ExtendedEchoRequest", 42),
        ("ExtendedEchoReply", 43),
    ];
    const V6: &[(&str, u8)] = &[
        ("DestinationUnreachable", 1),
        ("PacketTooBig", 2),
        ("TimeExceeded", 3),
        ("ParameterProblem", 4),
        ("EchoRequest", 128),
        ("EchoReply", 129),
        ("MulticastListenerQuery", 130),
        ("MulticastListenerReport", 131),
        ("MulticastListenerDone", 132),
        ("RouterSolicitation", 133),
        ("RouterAdvertisement", 134),
        ("NeighborSolicitation", 135),
        ("NeighborAdvertisement", 136),
        ("RedirectMessage", 137),
        ("RouterRenumbering", 138),
        ("ICMPNodeInformationQuery", 139),
        ("ICMPNodeInformationResponse", 140),
        ("InverseNeighborDiscoverySolicitation", 141),
        ("InverseNeighborDiscoveryAdvertisement", 142),
        ("HomeAgentAddressDiscoveryRequest", 144),
        ("HomeAgentAddressDiscoveryReply", 145),
        ("MobilePrefixSolicitation", 146),
        ("MobilePrefixAdvertisement", 147),
        ("DuplicateAddressRequestCodeSuffix", 157),
        ("DuplicateAddressConfirmationCodeSuffix", 158),
        ("ExtendedEchoRequest", 160),
        ("ExtendedEchoReply", 161),
    ];
    let table = if v6 { V6 } else { V4 };
    table.iter().find(|(n, _)| *n == name).map(|&(_, t)| t)
}

/// `toEntities` of a rule (None when absent); names dnsfence cannot tell get a note.
fn parse_entities(
    diag: &mut Diag<'_>,
    fields: &yaml::Fields<'_, '_>,
    path: &str,
    notes: &mut Vec<(usize, String)>,
) -> Option<Vec<Entity>> {
    let list = fields.get("toEntities")?;
    let list_path = join(path, "toEntities");
    let items = diag.non_empty_sequence(list, &list_path);
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = index(&list_path, i);
        let Some(name) = diag.string(item, &at) else {
            continue;
        };
        match Entity::parse(&name) {
            Some(Entity::Unknown) => {
                notes.push((
                    line(item),
                    format!(
                        "{at}: entity {name:?} is not known to dnsfence: it allows nothing here \
                         (fail closed)"
                    ),
                ));
                out.push(Entity::Unknown);
            }
            Some(e) => out.push(e),
            None => diag.invalid(item, &at, format!("unknown entity {name:?}")),
        }
    }
    Some(out)
}

/// One `egressDeny` item: an L3 target (or none: every destination) and ports.
fn parse_deny(
    diag: &mut Diag<'_>,
    node: &Node<'_>,
    path: &str,
    namespace: Option<&str>,
    notes: &mut Vec<(usize, String)>,
) -> Option<L3Rule> {
    let before = diag.errors.len();
    let fields = diag.mapping(node, path, DENY_FIELDS, HINT)?;
    let cidrs = parse_cidrs(diag, &fields, path);
    let entities = parse_entities(diag, &fields, path, notes);
    let icmps = parse_icmps(diag, &fields, node, path);
    let endpoints = fields
        .get("toEndpoints")
        .map(|list| parse_to_endpoints(diag, list, path, namespace, notes));
    let mut ports = Vec::new();
    if let Some(list) = fields.get_non_null("toPorts") {
        let list_path = join(path, "toPorts");
        for (i, item) in diag
            .sequence(list, &list_path)
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            if let Some(rule) = parse_port_rule(diag, item, index(&list_path, i)) {
                if rule.dns.is_some() {
                    diag.invalid(
                        rule.rules_key.unwrap_or(rule.node),
                        &join(&rule.path, "rules"),
                        "L7 rules in egressDeny are not allowed (Cilium rejects them too)",
                    );
                } else if let Some((at, what)) = &rule.l7 {
                    // Cilium's deny rules have ports only (the API server prunes the rest):
                    // the ports are denied whatever the L7 part says.
                    notes.push((
                        *at,
                        format!(
                            "{}: {what} has no meaning in egressDeny (Cilium's deny rules \
                             have ports only): the ports are denied",
                            rule.path
                        ),
                    ));
                }
                ports.extend(rule.ports);
            }
        }
    }
    ports.extend(icmps.into_iter().flatten());
    if diag.errors.len() != before {
        return None;
    }
    let selectors = [cidrs.is_some(), endpoints.is_some(), entities.is_some()];
    if selectors.iter().filter(|&&s| s).count() > 1 {
        diag.invalid(
            node,
            path,
            "one L3 selector per rule (toCIDR/toCIDRSet, toEndpoints or toEntities)",
        );
        return None;
    }
    let to = match (cidrs, endpoints, entities) {
        (Some(blocks), _, _) => L3Target::Cidrs(blocks),
        (_, Some(sel), _) => L3Target::Endpoints(sel),
        (_, _, Some(e)) => L3Target::Entities(e),
        (None, None, None) if ports.is_empty() => {
            diag.invalid(
                node,
                path,
                "an egressDeny rule needs a destination, toPorts or icmps",
            );
            return None;
        }
        (None, None, None) => L3Target::Any,
    };
    ports.sort_unstable();
    ports.dedup();
    Some(L3Rule { to, ports })
}

/// One `egress` item. `default_allow`: the spec sets `enableDefaultDeny.egress: false`, so
/// an entry dnsfence cannot enforce (L7, mutual authentication) is rejected instead of allowing
/// nothing: under default allow, "nothing more" would leave its traffic open where Cilium
/// filters it. A rule that needs what dnsfence cannot do (`toServices` before a Kubernetes
/// source knows services, mutual authentication) is validated, reported, and allows nothing:
/// fail closed for that rule only.
fn parse_egress(
    diag: &mut Diag<'_>,
    node: &Node<'_>,
    path: &str,
    namespace: Option<&str>,
    default_allow: bool,
    notes: &mut Vec<(usize, String)>,
) -> Option<Vec<EgressRule>> {
    let before = diag.errors.len();
    let services = parse_services(diag, node, path, namespace);
    let rules = parse_egress_rules(diag, node, path, namespace, default_allow, services, notes);
    let auth = parse_auth(diag, node, path);
    if diag.errors.len() != before {
        return None;
    }
    let rules = rules?;
    if let Some((at, what)) = auth {
        if default_allow {
            diag.invalid(
                node,
                &what,
                "mutual authentication under enableDefaultDeny.egress: false cannot be \
                 enforced: dnsfence cannot authenticate, and the endpoint's default allow would \
                 let the traffic through",
            );
            return None;
        }
        notes.push((
            at,
            format!(
                "{what}: dnsfence cannot do mutual authentication: this rule allows nothing, \
                 its traffic stays denied (fail closed)"
            ),
        ));
        return Some(vec![EgressRule::Nothing]);
    }
    Some(rules)
}

/// `toServices` of an egress rule, validated: what it names. A namespace left out is the
/// policy's own (a CNP's), or any (a CCNP's).
fn parse_services(
    diag: &mut Diag<'_>,
    node: &Node<'_>,
    path: &str,
    namespace: Option<&str>,
) -> Option<Vec<ServiceRef>> {
    let list = node.data.as_mapping_get("toServices")?;
    let list_path = join(path, "toServices");
    let items = diag.non_empty_sequence(list, &list_path);
    let mut refs = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = index(&list_path, i);
        let Some(f) = diag.mapping(item, &at, SERVICE_FIELDS, "") else {
            continue;
        };
        match (f.get("k8sService"), f.get("k8sServiceSelector")) {
            (Some(svc), None) => {
                let svc_path = join(&at, "k8sService");
                let Some(sf) = diag.mapping(svc, &svc_path, K8S_SERVICE_FIELDS, "") else {
                    continue;
                };
                let name = match sf.get("serviceName") {
                    Some(n) => diag.string(n, &join(&svc_path, "serviceName")),
                    None => {
                        missing(diag, svc, join(&svc_path, "serviceName"));
                        None
                    }
                };
                let ns = sf
                    .get_non_null("namespace")
                    .and_then(|n| diag.string(n, &join(&svc_path, "namespace")));
                if let Some(name) = name {
                    refs.push(ServiceRef::Named {
                        namespace: ns.or_else(|| namespace.map(str::to_string)),
                        name,
                    });
                }
            }
            (None, Some(sel)) => {
                let sel_path = join(&at, "k8sServiceSelector");
                let Some(sf) = diag.mapping(sel, &sel_path, SERVICE_SELECTOR_FIELDS, "") else {
                    continue;
                };
                let selector = match sf.get("selector") {
                    Some(s) => selector::parse(diag, s, &join(&sel_path, "selector")),
                    None => {
                        missing(diag, sel, join(&sel_path, "selector"));
                        None
                    }
                };
                let ns = sf
                    .get_non_null("namespace")
                    .and_then(|n| diag.string(n, &join(&sel_path, "namespace")));
                if let Some(selector) = selector {
                    refs.push(ServiceRef::Selector {
                        namespace: ns.or_else(|| namespace.map(str::to_string)),
                        selector,
                    });
                }
            }
            _ => diag.invalid(item, &at, "needs one of k8sService and k8sServiceSelector"),
        }
    }
    Some(refs)
}

/// `authentication` (or `auth`, its older spelling) of an egress rule, validated: when it asks
/// for mutual authentication, its line and `path.field: value` for the note.
fn parse_auth(diag: &mut Diag<'_>, node: &Node<'_>, path: &str) -> Option<(usize, String)> {
    for (key, field) in [("authentication", "mode"), ("auth", "type")] {
        let Some(value) = node.data.as_mapping_get(key) else {
            continue;
        };
        let at = join(path, key);
        let Some(f) = diag.mapping(value, &at, &[field], "") else {
            continue;
        };
        let field_path = join(&at, field);
        let Some(v) = f.get(field) else {
            missing(diag, value, field_path);
            continue;
        };
        let Some(mode) = diag.string(v, &field_path) else {
            continue;
        };
        // `mode: disabled`: no authentication asked, the rule works as written.
        if !(key == "authentication" && mode == "disabled") {
            return Some((line(v), format!("{field_path}: {mode}")));
        }
    }
    None
}

/// The rules of one `egress` item, but for `toServices` and `authentication` (see
/// [`parse_egress`]).
fn parse_egress_rules(
    diag: &mut Diag<'_>,
    node: &Node<'_>,
    path: &str,
    namespace: Option<&str>,
    default_allow: bool,
    services: Option<Vec<ServiceRef>>,
    notes: &mut Vec<(usize, String)>,
) -> Option<Vec<EgressRule>> {
    let before = diag.errors.len();
    let fields = diag.mapping(node, path, EGRESS_FIELDS, HINT)?;
    let cidrs = parse_cidrs(diag, &fields, path);
    let entities = parse_entities(diag, &fields, path, notes);
    let icmps = parse_icmps(diag, &fields, node, path);

    let to_endpoints = fields
        .get("toEndpoints")
        .map(|list| parse_to_endpoints(diag, list, path, namespace, notes));

    let to_fqdns = fields.get("toFQDNs").map(|list| {
        let list_path = join(path, "toFQDNs");
        let items = diag.sequence(list, &list_path).unwrap_or_default();
        if items.is_empty() && !yaml::is_null(list) {
            diag.invalid(list, &list_path, "empty list");
        }
        items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| parse_name_selector(diag, item, &index(&list_path, i)))
            .collect::<Vec<_>>()
    });

    let mut port_rules = Vec::new();
    if let Some(list) = fields.get_non_null("toPorts") {
        let list_path = join(path, "toPorts");
        for (i, item) in diag
            .sequence(list, &list_path)
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            if let Some(rule) = parse_port_rule(diag, item, index(&list_path, i)) {
                port_rules.push(rule);
            }
        }
    }
    if diag.errors.len() != before {
        return None;
    }
    // Entries with an L7 part dnsfence cannot enforce allow nothing: reported, then left out
    // (fail closed for their traffic), while the rest of the policy works.
    let had_ports = !port_rules.is_empty();
    if default_allow && let Some(rule) = port_rules.iter().find(|r| r.l7.is_some()) {
        let (_, what) = rule.l7.as_ref().expect("found");
        diag.invalid(
            rule.node,
            &format!("{}.{what}", rule.path),
            "an L7 entry under enableDefaultDeny.egress: false cannot be enforced: dnsfence \
             cannot filter its traffic by L7, and the endpoint's default allow would let it \
             all through",
        );
        return None;
    }
    port_rules.retain(|rule| match &rule.l7 {
        None => true,
        Some((line, what)) => {
            notes.push((
                *line,
                format!(
                    "{}.{what}: not enforced by dnsfence (L7): this toPorts entry allows \
                     nothing, its traffic stays denied",
                    rule.path
                ),
            ));
            false
        }
    });
    if had_ports && port_rules.is_empty() {
        // Every entry was L7: the rule allows nothing (never "every port").
        return Some(vec![EgressRule::Nothing]);
    }

    let l3_selectors = [
        cidrs.is_some(),
        entities.is_some(),
        to_fqdns.is_some() || to_endpoints.is_some(),
        fields.get("toServices").is_some(),
    ];
    if l3_selectors.iter().filter(|&&s| s).count() > 1 {
        diag.invalid(
            node,
            path,
            "toCIDR/toCIDRSet, toEntities, toServices and toFQDNs/toEndpoints cannot be \
             combined (one L3 selector per rule, as in Cilium)",
        );
        return None;
    }
    if let Some(selectors) = to_fqdns {
        if fields.get("toEndpoints").is_some() {
            diag.invalid(
                node,
                path,
                "toFQDNs cannot be combined with toEndpoints (Cilium rejects it too)",
            );
            return None;
        }
        let mut ports = Vec::new();
        for rule in port_rules {
            if rule.dns.is_some() {
                diag.invalid(
                    rule.rules_key.unwrap_or(rule.node),
                    &join(&rule.path, "rules"),
                    "rules.dns on a toFQDNs rule is not supported (put DNS rules on a rule \
                     towards the DNS server)",
                );
                return None;
            }
            ports.extend(rule.ports);
        }
        ports.extend(icmps.into_iter().flatten());
        ports.sort_unstable();
        ports.dedup();
        return Some(vec![EgressRule::Fqdn(FqdnRule { selectors, ports })]);
    }

    if cidrs.is_none()
        && entities.is_none()
        && to_endpoints.is_none()
        && services.is_none()
        && port_rules.is_empty()
        && icmps.is_none()
    {
        if fields.get("toPorts").is_some() {
            diag.invalid(node, path, "toPorts is empty");
            return None;
        }
        return Some(vec![EgressRule::Nothing]);
    }
    // `toPorts` entries with DNS rules make a DNS-layer rule (the DNS traffic itself is
    // redirected to the proxy); the others, with the L3 selector, an L3/L4 allow.
    let mut dns_ports = Vec::new();
    let mut l4_ports = Vec::new();
    let mut plain_entries = 0;
    if let Some(types) = icmps {
        // ICMP types are the L4 part of the rule, like a toPorts entry without DNS rules.
        plain_entries += 1;
        l4_ports.extend(types);
    }
    for rule in port_rules {
        match rule.dns {
            Some(names) => dns_ports.push(DnsPorts {
                ports: rule.ports,
                names,
            }),
            None => {
                plain_entries += 1;
                l4_ports.extend(rule.ports);
            }
        }
    }
    if diag.errors.len() != before {
        return None;
    }
    let to = match (cidrs, entities, to_endpoints) {
        (Some(blocks), _, _) => Some(L3Target::Cidrs(blocks)),
        (_, Some(e), _) => Some(L3Target::Entities(e)),
        (_, _, Some(sel)) => Some(L3Target::Endpoints(sel)),
        (None, None, None) => services.map(L3Target::Services),
    };
    let mut out = Vec::new();
    if !dns_ports.is_empty() {
        // The DNS servers the rule names (by registered endpoint, address or entity).
        out.push(EgressRule::Dns(DnsRule {
            to: to.clone(),
            ports: dns_ports,
        }));
    }
    // An L3 selector without toPorts, or toPorts entries without DNS rules: an L3/L4 allow.
    if plain_entries > 0 || (out.is_empty() && to.is_some()) {
        l4_ports.sort_unstable();
        l4_ports.dedup();
        out.push(EgressRule::L3(L3Rule {
            to: to.unwrap_or(L3Target::Any),
            ports: l4_ports,
        }));
    }
    Some(out)
}

fn parse_port_rule<'n, 'a>(
    diag: &mut Diag<'_>,
    node: &'n Node<'a>,
    path: String,
) -> Option<PortRule<'n, 'a>> {
    let before = diag.errors.len();
    let fields = diag.mapping(node, &path, PORT_RULE_FIELDS, HINT)?;
    let ports_path = join(&path, "ports");
    let mut ports = Vec::new();
    match fields.get_non_null("ports") {
        None => missing(diag, node, ports_path.clone()),
        Some(list) => {
            let items = diag.sequence(list, &ports_path).unwrap_or_default();
            if items.is_empty() {
                diag.invalid(list, &ports_path, "empty list");
            }
            for (i, item) in items.iter().enumerate() {
                if let Some(p) = parse_port(diag, item, &index(&ports_path, i)) {
                    ports.push(p);
                }
            }
        }
    }
    let mut dns = None;
    // TLS / listener fields of the entry itself.
    let mut l7 = UNENFORCED_L7
        .iter()
        .find_map(|k| fields.key(k).map(|key| (line(key), (*k).to_string())));
    if let Some(rules) = fields.get("rules") {
        let rules_path = join(&path, "rules");
        let rf = diag.mapping(rules, &rules_path, L7_FIELDS, HINT)?;
        if diag.errors.len() != before {
            return None;
        }
        if let Some(found) = UNENFORCED_L7
            .iter()
            .find_map(|k| rf.key(k).map(|key| (line(key), format!("rules.{k}"))))
        {
            l7.get_or_insert(found);
        }
        let dns_path = join(&rules_path, "dns");
        match rf.get_non_null("dns") {
            // `rules: {http: ...}`: no DNS rules, and the entry is left out anyway.
            None if l7.is_some() => {}
            None => missing(diag, rules, dns_path),
            Some(list) => {
                let names = diag
                    .sequence(list, &dns_path)
                    .unwrap_or_default()
                    .iter()
                    .enumerate()
                    .filter_map(|(i, item)| parse_name_selector(diag, item, &index(&dns_path, i)))
                    .collect();
                dns = Some(names);
            }
        }
    }
    if let (Some(_), Some(list)) = (&dns, fields.get_non_null("ports")) {
        // Cilium refuses both ("L7 rules can not be used when a port is 0", "DNS rules do
        // not support port ranges"); dnsfence did apply them, to every port or to the range.
        if ports.iter().any(|p| p.port == 0) {
            diag.invalid(
                list,
                &ports_path,
                "DNS rules need a port: port 0 (every port) cannot carry L7 rules (Cilium \
                 rejects it too)",
            );
        } else if ports.iter().any(|p| p.end_port != p.port) {
            diag.invalid(
                list,
                &ports_path,
                "DNS rules do not support port ranges (endPort); Cilium rejects them too",
            );
        }
    }
    if diag.errors.len() != before {
        return None;
    }
    ports.sort_unstable();
    ports.dedup();
    Some(PortRule {
        node,
        rules_key: fields.key("rules"),
        path,
        ports,
        dns,
        l7,
    })
}

fn parse_port(diag: &mut Diag<'_>, node: &Node<'_>, path: &str) -> Option<PortProto> {
    let fields = diag.mapping(node, path, PORT_FIELDS, HINT)?;
    let port_path = join(path, "port");
    let Some(port_node) = fields.get("port") else {
        missing(diag, node, port_path);
        return None;
    };
    let port = port_number(diag, port_node, &port_path)?;
    let end_port = match fields.get_non_null("endPort") {
        // Cilium: port 0 is every port.
        None if port == 0 => u16::MAX,
        None => port,
        Some(n) if port == 0 => {
            diag.invalid(
                n,
                &join(path, "endPort"),
                "port 0 already means every port: endPort needs a port from 1",
            );
            return None;
        }
        Some(n) => {
            let end_path = join(path, "endPort");
            let end = port_number(diag, n, &end_path)?;
            if end < port {
                diag.invalid(n, &end_path, format!("{end} is below port {port}"));
                return None;
            }
            end
        }
    };
    let proto = match fields.get_non_null("protocol") {
        None => PortProtocol::Any,
        Some(n) => {
            let proto_path = join(path, "protocol");
            match diag.string(n, &proto_path)?.as_str() {
                "TCP" => PortProtocol::Tcp,
                "UDP" => PortProtocol::Udp,
                "SCTP" => PortProtocol::Sctp,
                "ANY" => PortProtocol::Any,
                other => {
                    diag.invalid(
                        n,
                        &proto_path,
                        format!("unsupported protocol {other:?} (expected TCP, UDP, SCTP or ANY)"),
                    );
                    return None;
                }
            }
        }
    };
    Some(PortProto {
        port,
        end_port,
        proto,
    })
}

/// A port number 0-65535 (0: every port), given as a string (Cilium's form) or an integer.
fn port_number(diag: &mut Diag<'_>, node: &Node<'_>, path: &str) -> Option<u16> {
    use saphyr::{Scalar, YamlData};
    let value: Result<i64, String> = match &node.data {
        YamlData::Value(Scalar::Integer(i)) => Ok(*i),
        YamlData::Value(Scalar::String(s)) => {
            if s.len() > 1 && s.starts_with('0') && s.bytes().all(|b| b.is_ascii_digit()) {
                // Cilium parses port strings with base 0: "053" is octal 43, "08" an error.
                // Refused rather than guessed either way.
                Err(format!(
                    "port {s:?} has a leading zero, which Cilium reads as an octal number; \
                     write the port without it"
                ))
            } else if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
                s.parse::<i64>()
                    .map_err(|_| format!("port {s:?} is out of range 0-65535"))
            } else {
                Err(format!(
                    "named port {s:?} is not supported (use a port number)"
                ))
            }
        }
        _ => Err(format!(
            "expected a port number, found {}",
            yaml::kind(node)
        )),
    };
    match value {
        Ok(n) if (0..=65535).contains(&n) => Some(n as u16),
        Ok(n) => {
            diag.invalid(node, path, format!("port {n} is out of range 0-65535"));
            None
        }
        Err(reason) => {
            diag.invalid(node, path, reason);
            None
        }
    }
}

/// `{matchName: ...}` or `{matchPattern: ...}`.
fn parse_name_selector(diag: &mut Diag<'_>, node: &Node<'_>, path: &str) -> Option<Pattern> {
    let fields = diag.mapping(node, path, NAME_FIELDS, HINT)?;
    let (key, kind) = match (fields.get("matchName"), fields.get("matchPattern")) {
        (Some(_), Some(_)) => {
            diag.invalid(node, path, "set only one of matchName and matchPattern");
            return None;
        }
        (Some(_), None) => ("matchName", PatternKind::Name),
        (None, Some(_)) => ("matchPattern", PatternKind::Pattern),
        (None, None) => {
            diag.invalid(node, path, "needs matchName or matchPattern");
            return None;
        }
    };
    let value = fields.get(key)?;
    let field = join(path, key);
    let text = diag.string(value, &field)?;
    match Pattern::parse_as(&text, kind) {
        Ok(p) => Some(p),
        Err(error) => {
            diag.push(line(value), LoadErrorKind::Pattern { field, error });
            None
        }
    }
}
