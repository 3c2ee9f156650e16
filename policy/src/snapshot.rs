//! The compiled, immutable view the data plane queries per DNS packet.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use dnsfence_matcher::{Matcher, MatcherBuilder, Name, Pattern, RuleId, RuleSet};

use crate::cidr::{Cidr, CidrBlock, Entity, L3Entry, LpmTable, NodeFacts, Scope, compile_table};
use crate::endpoints::{Endpoints, canonical_cgroup, canonical_ip};
use crate::policy::{EgressRule, L3Rule, L3Target, PolicySet, PortProto, PortProtocol, Proto};
use crate::selector::LabelSelector;

/// A workload of the snapshot's endpoint registry: an index, valid for that snapshot only.
/// Anything that outlives a snapshot (allow entries, caches, records) uses [`EndpointKey`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct EndpointId(pub u32);

/// The stable identity of a workload across reloads and processes: the first 64 bits of the
/// SHA-256 of `namespace/name`. A reload that reorders the endpoints file renumbers
/// [`EndpointId`]s but keeps every key, so allow entries never pass from one workload to
/// another; and a workload cannot pick a name whose key equals another's (a second preimage
/// of 64 bits), as it could with a fast non-cryptographic hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct EndpointKey(pub u64);

impl EndpointKey {
    /// The key of the endpoint `namespace/name`.
    pub fn of(namespace: &str, name: &str) -> EndpointKey {
        use sha2::{Digest, Sha256};
        let digest = Sha256::new()
            .chain_update(namespace.as_bytes())
            .chain_update(b"/")
            .chain_update(name.as_bytes())
            .finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        EndpointKey(u64::from_be_bytes(first))
    }
}

/// The DNS-layer verdict for one query.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DnsVerdict {
    /// A DNS rule of a policy selecting the endpoint allows the name: forward it.
    Allow,
    /// The endpoint is under egress policy and no DNS rule allows the query: refuse it.
    Deny,
    /// No egress policy selects the endpoint: everything is allowed (Cilium semantics).
    Unrestricted,
}

const NO_GROUP: u32 = u32::MAX;

#[derive(Debug)]
struct EndpointEntry {
    /// `namespace/name`.
    name: Box<str>,
    /// Stable identity.
    key: EndpointKey,
    /// Whether the endpoint has source addresses (else only its cgroup identifies it).
    has_ips: bool,
    /// Index into `Snapshot::groups`, or `NO_GROUP` when unrestricted.
    group: u32,
}

/// Which DNS servers a DNS entry applies to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Servers {
    /// No L3 selector: any destination.
    Any,
    /// The servers an L3 selector names.
    Named {
        /// `toEndpoints`: the registered endpoints (bitset by `EndpointId`) it selects.
        endpoints: Box<[u64]>,
        /// `toCIDR`/`toCIDRSet`, `toEntities`, and the entities of `reserved:` selectors, as
        /// prefixes (usually a few; scanned only for a server no endpoint bit matched).
        prefixes: Box<[CidrBlock]>,
    },
}

impl Servers {
    /// Whether the server at `ip`, owned by registered endpoint `owner`, is one of these
    /// (`inside`: whether `ip` is inside the cluster, asked only for a scoped prefix).
    fn contains(&self, owner: Option<EndpointId>, ip: IpAddr, inside: impl Fn() -> bool) -> bool {
        match self {
            Servers::Any => true,
            Servers::Named {
                endpoints,
                prefixes,
            } => {
                owner.is_some_and(|ep| {
                    endpoints
                        .get(ep.0 as usize / 64)
                        .is_some_and(|w| w & (1u64 << (ep.0 % 64)) != 0)
                }) || (!prefixes.is_empty() && {
                    let host = Cidr::host(ip);
                    prefixes.iter().any(|b| {
                        b.covers(&host) && (b.scope == Scope::Any || b.scope.holds(inside()))
                    })
                })
            }
        }
    }
}

/// The names a DNS entry allows.
#[derive(Debug)]
enum Names {
    /// `dns: []` somewhere in the entry: every name.
    All,
    /// Its patterns, in the group's matcher under the entry's index as tag.
    Listed,
}

/// All DNS rules of a group that share their ports and their L3 part, compiled together.
#[derive(Debug)]
struct DnsEntry {
    ports: Box<[PortProto]>,
    servers: Servers,
    names: Names,
}

/// Endpoints selected by exactly the same specs share one group (like Cilium identities).
#[derive(Debug)]
struct Group {
    dns: Box<[DnsEntry]>,
    /// Every name pattern of the group in one matcher, so that a query's name is walked
    /// once: a DNS entry's patterns tagged with the entry's index `i` (`RuleId(i)`), a
    /// toFQDNs selector with `dns.len() + k`, `fqdn_ids[k]` being its rule's `RuleId`.
    names: Matcher,
    /// The group's toFQDNs rules, by tag (see `names`).
    fqdn_ids: Box<[RuleId]>,
    /// The distinct port entries of the group's toFQDNs rules, sorted (a rule without
    /// `toPorts` contributes every port over any protocol): the datapath's port specs.
    fqdn_ports: Box<[PortProto]>,
    /// The group's L3/L4 rules (allow and `egressDeny`) as a longest-prefix-match table, when
    /// it differs from `servers_l3` (default allow adds an allow of every address); None
    /// under default deny, where the two are the same table (compiled once).
    l3: Option<LpmTable>,
    /// The same rules without the default allow of `enableDefaultDeny.egress: false`, indexed
    /// for the DNS verdict: an `egressDeny` of the server denies the query, and an L3/L4 allow
    /// of the server and port lets every name through (see `Snapshot::verdict`).
    servers_l3: LpmTable,
    /// The explicit allows whose port entries wildcard the DNS rules of a port (Cilium's
    /// `wildcardL3L4Rules`): entries without ports, port 0, or the very port; not port ranges,
    /// and not `toServices` rules (Cilium's `AllowsWildcarding` excludes them).
    servers_wildcard: LpmTable,
    /// Whether some selecting spec asks for egress default deny. Without it (every selecting
    /// spec sets `enableDefaultDeny.egress: false`), the L3 table allows every address and
    /// the DNS rules judge only the queries they cover; `egressDeny` still wins.
    default_deny: bool,
}

impl Group {
    /// What the group's explicit L3/L4 rules say of DNS to `ip:port` over `proto`:
    /// `Some(false)` an egressDeny covers it, `Some(true)` an allow does, None neither.
    #[inline]
    fn server_l3(
        &self,
        ip: IpAddr,
        port: u16,
        proto: Proto,
        inside: impl FnOnce() -> bool,
    ) -> Option<bool> {
        if self.servers_l3.is_empty() {
            return None;
        }
        self.servers_l3
            .lookup(ip)?
            .judge(|p| p.covers(port, proto), inside)
    }

    /// Whether an explicit allow of `ip:port` over `proto` wildcards the DNS rules that cover
    /// the query (see `servers_wildcard`).
    #[inline]
    fn server_wildcards(
        &self,
        ip: IpAddr,
        port: u16,
        proto: Proto,
        inside: impl FnOnce() -> bool,
    ) -> bool {
        !self.servers_wildcard.is_empty()
            && self
                .servers_wildcard
                .lookup(ip)
                .is_some_and(|e| e.judge(|p| p.covers(port, proto), inside) == Some(true))
    }
}

/// Why a DNS query got its verdict ([`Snapshot::dns_reason`]), for tools such as
/// `dnsfence policy check --explain`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DnsReason {
    /// No egress policy selects the endpoint.
    Unrestricted,
    /// An `egressDeny` covers the server, port and transport: refused whatever the name.
    EgressDeny,
    /// An L3/L4 allow (no `rules.dns`) covers the server and port: every name forwarded.
    L3Rule,
    /// A DNS rule covering the query allows the name.
    DnsRule,
    /// Under default deny (or covered by DNS rules), no rule allows the query.
    DefaultDeny,
    /// Default allow (`enableDefaultDeny.egress: false`) and no rule is about the query.
    DefaultAllow,
}

impl DnsReason {
    /// `egressDeny`, `l3-rule`, `dns-rule`, `default-deny`, `default-allow`, `unrestricted`.
    pub fn as_str(self) -> &'static str {
        match self {
            DnsReason::Unrestricted => "unrestricted",
            DnsReason::EgressDeny => "egressDeny",
            DnsReason::L3Rule => "l3-rule",
            DnsReason::DnsRule => "dns-rule",
            DnsReason::DefaultDeny => "default-deny",
            DnsReason::DefaultAllow => "default-allow",
        }
    }
}

/// Counts of a snapshot, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SnapshotStats {
    /// Registered endpoints.
    pub endpoints: usize,
    /// Endpoints under egress policy.
    pub restricted: usize,
    /// Distinct groups (sets of applicable specs).
    pub groups: usize,
    /// toFQDNs rules (`RuleId`s).
    pub fqdn_rules: usize,
    /// Endpoints with no source address (recognised by cgroup only).
    pub without_ips: usize,
    /// Endpoints denied everything because a policy that selects them failed to load.
    pub fail_closed: usize,
}

/// The compiled policy and endpoint registry. Immutable; shared as `Arc<Snapshot>`.
///
/// Queries never allocate or lock, and their cost does not depend on the number of patterns:
/// a verdict is a hash lookup for the endpoint's group, a scan of the group's few DNS entries,
/// and one matcher lookup per entry that covers the query's server and port.
#[derive(Debug)]
pub struct Snapshot {
    generation: u64,
    /// The identity of the policy texts and node facts this was compiled from, the same in
    /// every process that compiles them (0: not known). See [`Snapshot::policy_id`].
    policy_id: u64,
    endpoints: Box<[EndpointEntry]>,
    /// Source addresses (IPv4 as IPv4-mapped IPv6) sorted, for a binary search per query:
    /// no hashing, and a few cache lines for the endpoints of a node.
    by_ip: Box<[(u128, EndpointId)]>,
    /// Stable keys sorted, for finding a workload again after a reload.
    by_key: Box<[(EndpointKey, EndpointId)]>,
    by_cgroup: HashMap<Box<str>, EndpointId>,
    groups: Box<[Group]>,
    /// The group that allows nothing (endpoints selected by a policy that failed to load), if
    /// any endpoint is in it.
    deny_all: u32,
    rule_ports: Box<[Box<[PortProto]>]>,
    /// The cluster's and the node's addresses a toFQDNs answer never opens, for
    /// [`Snapshot::in_cluster`].
    cluster: LpmTable,
    /// What `world` leaves out, minimal: for [`Snapshot::inside`].
    inside: LpmTable,
}

/// The lookup key of a source address: IPv4 and IPv4-mapped IPv6 as the mapped form.
fn ip_key(ip: IpAddr) -> u128 {
    match canonical_ip(ip) {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

impl Default for Snapshot {
    fn default() -> Snapshot {
        Snapshot::empty()
    }
}

impl Snapshot {
    /// No endpoints, no policy.
    pub fn empty() -> Snapshot {
        Snapshot {
            generation: 0,
            policy_id: 0,
            endpoints: Box::new([]),
            by_ip: Box::new([]),
            by_key: Box::new([]),
            by_cgroup: HashMap::new(),
            groups: Box::new([]),
            deny_all: NO_GROUP,
            rule_ports: Box::new([]),
            cluster: LpmTable::default(),
            inside: LpmTable::default(),
        }
    }

    /// Compiles validated policies against an endpoint registry.
    pub fn compile(policies: &PolicySet, endpoints: &Endpoints) -> Snapshot {
        compile(policies, endpoints, &[], &NodeFacts::default())
    }

    /// Like [`Snapshot::compile_fail_closed`], with what the node knows of itself and its
    /// cluster (`toEntities`).
    pub fn compile_on(
        policies: &PolicySet,
        endpoints: &Endpoints,
        fail_closed: &[LabelSelector],
        node: &NodeFacts,
    ) -> Snapshot {
        compile(policies, endpoints, fail_closed, node)
    }

    /// Like [`Snapshot::compile`], and every endpoint one of `fail_closed` selects is denied
    /// everything (DNS and toFQDNs), whatever the policies say: the endpoints of a policy that
    /// failed to load.
    pub fn compile_fail_closed(
        policies: &PolicySet,
        endpoints: &Endpoints,
        fail_closed: &[LabelSelector],
    ) -> Snapshot {
        compile(policies, endpoints, fail_closed, &NodeFacts::default())
    }

    /// The endpoint that owns source address `ip` (IPv4-mapped IPv6 is looked up as IPv4).
    pub fn endpoint_by_ip(&self, ip: IpAddr) -> Option<EndpointId> {
        let key = ip_key(ip);
        self.by_ip
            .binary_search_by_key(&key, |&(k, _)| k)
            .ok()
            .map(|i| self.by_ip[i].1)
    }

    /// The endpoint of a cgroup path below the cgroup root (leading/trailing `/` ignored).
    pub fn endpoint_by_cgroup(&self, cgroup_path: &str) -> Option<EndpointId> {
        self.by_cgroup.get(canonical_cgroup(cgroup_path)).copied()
    }

    /// The endpoint named `namespace/name`, or `name` when only one namespace has it.
    pub fn endpoint_by_name(&self, name: &str) -> Option<EndpointId> {
        if name.contains('/') {
            return self.endpoints().find(|&ep| self.endpoint_name(ep) == name);
        }
        let mut found = self.endpoints().filter(|&ep| {
            self.endpoint_name(ep)
                .rsplit_once('/')
                .is_some_and(|(_, n)| n == name)
        });
        let first = found.next()?;
        found.next().is_none().then_some(first)
    }

    /// `namespace/name` of `ep` (empty for an id this snapshot does not know).
    pub fn endpoint_name(&self, ep: EndpointId) -> &str {
        self.endpoints.get(ep.0 as usize).map_or("", |e| &e.name)
    }

    /// The endpoint with stable key `key` in this snapshot, if it is registered.
    pub fn endpoint_by_key(&self, key: EndpointKey) -> Option<EndpointId> {
        self.by_key
            .binary_search_by_key(&key, |&(k, _)| k)
            .ok()
            .map(|i| self.by_key[i].1)
    }

    /// The stable key of `ep` (see [`EndpointKey`]); `EndpointKey(0)` for an unknown id.
    pub fn endpoint_key(&self, ep: EndpointId) -> EndpointKey {
        self.endpoints
            .get(ep.0 as usize)
            .map_or(EndpointKey(0), |e| e.key)
    }

    /// Every endpoint, in registry order.
    pub fn endpoints(&self) -> impl Iterator<Item = EndpointId> + '_ {
        (0..self.endpoints.len() as u32).map(EndpointId)
    }

    /// Whether some egress policy selects `ep` (then its egress is default-deny). An unknown
    /// id counts as restricted.
    pub fn is_restricted(&self, ep: EndpointId) -> bool {
        self.endpoints
            .get(ep.0 as usize)
            .is_none_or(|e| e.group != NO_GROUP)
    }

    /// DNS layer: may `ep` resolve `name` via server `server` (the original destination of the
    /// query) over `proto`? An id this snapshot does not know is denied.
    pub fn dns_verdict(
        &self,
        ep: EndpointId,
        server: SocketAddr,
        proto: Proto,
        name: &Name,
    ) -> DnsVerdict {
        self.verdict(ep, Some(server.ip()), server.port(), proto, name, None)
    }

    /// [`Snapshot::dns_verdict`] and, into `fqdn` (cleared first), the toFQDNs rules whose
    /// selectors match `name` ([`Snapshot::fqdn_rules`]), in one walk of the name: the data
    /// plane's query path, which keeps the rules for the answer. `fqdn` is filled whatever
    /// the verdict (empty for an unrestricted or unknown endpoint); allocation-free when it
    /// came from [`Snapshot::rule_set`].
    pub fn judge(
        &self,
        ep: EndpointId,
        server: SocketAddr,
        proto: Proto,
        name: &Name,
        fqdn: &mut RuleSet,
    ) -> DnsVerdict {
        self.verdict(
            ep,
            Some(server.ip()),
            server.port(),
            proto,
            name,
            Some(fqdn),
        )
    }

    /// Like [`Snapshot::dns_verdict`] with the L3 part (`toEndpoints`) of DNS rules not
    /// checked: whether *some* server the policy allows on `port` would get the query. For
    /// tools (`dnsfence policy check` without `--server`), not the data plane.
    pub fn dns_verdict_any_server(
        &self,
        ep: EndpointId,
        port: u16,
        proto: Proto,
        name: &Name,
    ) -> DnsVerdict {
        self.verdict(ep, None, port, proto, name, None)
    }

    /// Why [`Snapshot::dns_verdict`] (with `server`) or [`Snapshot::dns_verdict_any_server`]
    /// (without) decides as it does for this query. For tools, not the data plane.
    pub fn dns_reason(
        &self,
        ep: EndpointId,
        server: Option<IpAddr>,
        port: u16,
        proto: Proto,
        name: &Name,
    ) -> DnsReason {
        self.decide(ep, server, port, proto, name, None).1
    }

    /// Whether DNS entry `dns` covers a query to `server_ip:port` over `proto` (`owner`: the
    /// endpoint owning the server address, looked up once and only when needed).
    #[inline]
    fn covers(
        &self,
        dns: &DnsEntry,
        server_ip: Option<IpAddr>,
        port: u16,
        proto: Proto,
        owner: &mut Option<Option<EndpointId>>,
    ) -> bool {
        if !dns.ports.iter().any(|p| p.covers(port, proto)) {
            return false;
        }
        if let Some(ip) = server_ip
            && let Servers::Named { .. } = dns.servers
        {
            let owner = *owner.get_or_insert_with(|| self.endpoint_by_ip(ip));
            return dns.servers.contains(owner, ip, || self.inside(ip));
        }
        true
    }

    #[inline]
    fn verdict(
        &self,
        ep: EndpointId,
        server_ip: Option<IpAddr>,
        port: u16,
        proto: Proto,
        name: &Name,
        fqdn: Option<&mut RuleSet>,
    ) -> DnsVerdict {
        self.decide(ep, server_ip, port, proto, name, fqdn).0
    }

    /// The verdict and why (see [`DnsReason`]).
    fn decide(
        &self,
        ep: EndpointId,
        server_ip: Option<IpAddr>,
        port: u16,
        proto: Proto,
        name: &Name,
        mut fqdn: Option<&mut RuleSet>,
    ) -> (DnsVerdict, DnsReason) {
        if let Some(out) = fqdn.as_deref_mut() {
            out.clear();
        }
        let Some(entry) = self.endpoints.get(ep.0 as usize) else {
            return (DnsVerdict::Deny, DnsReason::DefaultDeny);
        };
        let Some(group) = self.groups.get(entry.group as usize) else {
            return (DnsVerdict::Unrestricted, DnsReason::Unrestricted);
        };
        // The L3/L4 rules about the server, as Cilium applies them to the DNS traffic its
        // proxy sees: an `egressDeny` of the server and port denies the query whatever the DNS
        // rules say (deny wins); an L3 or L4 allow of them (a rule without `rules.dns`) lets
        // every name through, as Cilium's L3/L4-only rules wildcard the L7 rules of the port.
        let server_l3 =
            server_ip.and_then(|ip| group.server_l3(ip, port, proto, || self.inside(ip)));
        if server_l3 == Some(false) {
            return (DnsVerdict::Deny, DnsReason::EgressDeny);
        }
        let mut owner = None;
        let mut covered = false;
        let mut allowed = false;
        // The covering entries that list names: bit i for entry i < 64 (entries beyond are
        // checked again when their tag matches; groups that large are rare).
        let mut listed: u64 = 0;
        let mut listed_beyond = false;
        for (i, dns) in group.dns.iter().enumerate() {
            if !self.covers(dns, server_ip, port, proto, &mut owner) {
                continue;
            }
            covered = true;
            match dns.names {
                Names::All => allowed = true,
                Names::Listed if i < 64 => listed |= 1 << i,
                Names::Listed => listed_beyond = true,
            }
        }
        let mut by_l3 = false;
        if !allowed {
            allowed = match server_ip {
                // No DNS rule is about the query (Cilium: no proxy redirect for that peer and
                // port): plain L3/L4 traffic, allowed if an L3/L4 allow covers it.
                _ if !covered => server_l3 == Some(true),
                // DNS rules are: an L3/L4-only allow of the very port wildcards them.
                Some(ip) => group.server_wildcards(ip, port, proto, || self.inside(ip)),
                None => false,
            };
            by_l3 = allowed;
        }
        let entries = group.dns.len();
        let walk_dns = !allowed && (listed != 0 || listed_beyond);
        if walk_dns || fqdn.is_some() {
            group.names.for_each_match(name, |tag| {
                let t = tag.0 as usize;
                if t >= entries {
                    if let Some(out) = fqdn.as_deref_mut() {
                        out.insert(group.fqdn_ids[t - entries]);
                    }
                } else if !allowed {
                    allowed = if t < 64 {
                        listed & (1 << t) != 0
                    } else {
                        listed_beyond
                            && self.covers(&group.dns[t], server_ip, port, proto, &mut owner)
                    };
                }
            });
        }
        if by_l3 {
            (DnsVerdict::Allow, DnsReason::L3Rule)
        } else if allowed {
            (DnsVerdict::Allow, DnsReason::DnsRule)
        } else if group.default_deny || covered {
            (DnsVerdict::Deny, DnsReason::DefaultDeny)
        } else {
            // Default allow, and no DNS rule is about this query.
            (DnsVerdict::Unrestricted, DnsReason::DefaultAllow)
        }
    }

    /// L3/L4 layer: the toFQDNs rules of policies selecting `ep` whose selectors match `name`
    /// (`out` is cleared first). Returns false when none. An unrestricted endpoint has no
    /// rules (check [`Snapshot::is_restricted`] or the DNS verdict first).
    pub fn fqdn_rules(&self, ep: EndpointId, name: &Name, out: &mut RuleSet) -> bool {
        out.clear();
        let Some(group) = self
            .endpoints
            .get(ep.0 as usize)
            .and_then(|e| self.groups.get(e.group as usize))
        else {
            return false;
        };
        let entries = group.dns.len();
        group.names.for_each_match(name, |tag| {
            if let Some(&rule) = (tag.0 as usize)
                .checked_sub(entries)
                .and_then(|k| group.fqdn_ids.get(k))
            {
                out.insert(rule);
            }
        });
        !out.is_empty()
    }

    /// A scratch set with room for every toFQDNs rule id, so that `fqdn_rules` never allocates.
    pub fn rule_set(&self) -> RuleSet {
        RuleSet::with_max_rule(self.rule_ports.len().saturating_sub(1) as u32)
    }

    /// The distinct port entries of the toFQDNs rules of policies selecting `ep`, sorted; a
    /// rule without `toPorts` appears as [`PortProto::ALL`]. Empty for an unrestricted or
    /// unknown endpoint. These are the datapath's port specs of the endpoint.
    pub fn fqdn_ports(&self, ep: EndpointId) -> &[PortProto] {
        self.endpoints
            .get(ep.0 as usize)
            .and_then(|e| self.groups.get(e.group as usize))
            .map_or(&[], |g| &g.fqdn_ports)
    }

    /// The L3/L4 table of `ep` (toCIDR, toCIDRSet, toEndpoints and toPorts-only rules, and
    /// egressDeny): the longest prefix containing a destination gives the ports allowed and
    /// denied there. Empty for an unrestricted or unknown endpoint.
    pub fn l3_table(&self, ep: EndpointId) -> &[L3Entry] {
        self.l3_lpm(ep).map_or(&[], LpmTable::entries)
    }

    /// The L3/L4 table of `ep`, indexed.
    fn l3_lpm(&self, ep: EndpointId) -> Option<&LpmTable> {
        self.endpoints
            .get(ep.0 as usize)
            .and_then(|e| self.groups.get(e.group as usize))
            .map(|g| g.l3.as_ref().unwrap_or(&g.servers_l3))
    }

    /// L3/L4 verdict for `ep` reaching `ip:port` over `proto` (for `Icmp` / `Icmp6`, `port` is
    /// the message type) by its L3 rules alone:
    /// `Some(false)` when an egressDeny covers it, `Some(true)` when an allow covers it and
    /// no deny does, None otherwise (then only a toFQDNs entry could allow it).
    pub fn l3_verdict(
        &self,
        ep: EndpointId,
        ip: IpAddr,
        port: u16,
        proto: PortProtocol,
    ) -> Option<bool> {
        let entry = self.l3_lpm(ep)?.lookup(ip)?;
        entry.judge(
            |p| (p.port..=p.end_port).contains(&port) && p.proto.includes(proto),
            || self.inside(ip),
        )
    }

    /// Whether `ip` is inside the cluster or node-local: a registered endpoint's or
    /// service's address, another node's, one in `--cluster-cidr`, the node's own
    /// (`--node-ip`), or node-local (unspecified, loopback, link-local: the
    /// cloud metadata service at 169.254.169.254 among them). A toFQDNs answer never opens
    /// such an address (the allow ledger refuses it): as in Cilium, where those addresses
    /// carry identities of their own that no FQDN selector selects, a name resolving into
    /// the cluster or onto the node (DNS rebinding) reaches nothing there; a workload that
    /// must reach one says so with an L3 rule (`toCIDR`, `toEntities`). Loopback is opened
    /// only under `--open-loopback-answers` ([`NodeFacts::open_loopback`]: a node whose
    /// host-process endpoints meet their servers there, and the tests). The ranges of
    /// `--deny-answer-cidr` ([`NodeFacts::deny_answers`]) count too, whatever else opens.
    pub fn in_cluster(&self, ip: IpAddr) -> bool {
        !self.cluster.is_empty() && self.cluster.lookup(ip).is_some()
    }

    /// Whether `ip` is inside the cluster as `toEntities` sees it: what `cluster` takes and
    /// `world` and the CIDR rules leave out (the node itself, its loopback included, the
    /// other nodes, the registered endpoints and services, `--cluster-cidr`). The L3
    /// tables' scoped port entries ([`crate::cidr::Scope`]) apply by it.
    pub fn inside(&self, ip: IpAddr) -> bool {
        self.inside.lookup(ip).is_some()
    }

    /// The prefixes of [`Snapshot::inside`], minimal (none inside another): what the
    /// datapath's cluster map holds.
    pub fn inside_prefixes(&self) -> impl Iterator<Item = Cidr> + '_ {
        self.inside.entries().iter().map(|e| e.cidr)
    }

    /// Endpoints with a cgroup, as `(cgroup path, endpoint)` (canonical paths, see
    /// [`Snapshot::endpoint_by_cgroup`]).
    pub fn cgroups(&self) -> impl Iterator<Item = (&str, EndpointId)> + '_ {
        self.by_cgroup.iter().map(|(path, &ep)| (&**path, ep))
    }

    /// The ports a toFQDNs rule opens; an empty slice means every port.
    pub fn rule_ports(&self, rule: RuleId) -> &[PortProto] {
        self.rule_ports.get(rule.0 as usize).map_or(&[], |p| p)
    }

    /// The generation the loader or caller gave this snapshot.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Sets the generation (before the snapshot is shared).
    pub fn set_generation(&mut self, generation: u64) {
        self.generation = generation;
    }

    /// The identity of the policy this snapshot was compiled from (its texts in force and
    /// node facts), equal in the agent and in a standalone proxy that compiled the same
    /// texts, whatever their generations; 0 when whoever built it gave none. The allow
    /// writers compare it: a proxy does not put back what the agent removed under a policy
    /// the proxy does not have yet.
    pub fn policy_id(&self) -> u64 {
        self.policy_id
    }

    /// Sets the policy identity (before the snapshot is shared).
    pub fn set_policy_id(&mut self, id: u64) {
        self.policy_id = id;
    }

    /// Counts, for logs and metrics.
    pub fn stats(&self) -> SnapshotStats {
        SnapshotStats {
            endpoints: self.endpoints.len(),
            restricted: self
                .endpoints
                .iter()
                .filter(|e| e.group != NO_GROUP)
                .count(),
            groups: self.groups.len(),
            fqdn_rules: self.rule_ports.len(),
            without_ips: self.endpoints.iter().filter(|e| !e.has_ips).count(),
            fail_closed: self
                .endpoints
                .iter()
                .filter(|e| e.group != NO_GROUP && e.group == self.deny_all)
                .count(),
        }
    }
}

/// One egress-enforcing spec with the ids of its toFQDNs rules.
struct FlatSpec<'p> {
    selector: &'p LabelSelector,
    rules: &'p [EgressRule],
    deny: &'p [L3Rule],
    /// Whether the spec asks for egress default deny.
    default_deny: bool,
    /// `RuleId` of each rule (meaningful for toFQDNs rules only).
    rule_ids: Vec<u32>,
    /// Servers of each DNS rule.
    servers: Vec<Servers>,
}

/// The DNS servers a DNS rule's L3 selector names: registered endpoints by bit, the rest
/// (CIDRs, entities, `reserved:` identities, the addresses of the services whose pods the
/// selector all selects) as prefixes.
fn servers_of(
    to: Option<&L3Target>,
    reg: &Endpoints,
    node: &NodeFacts,
    inside: &LpmTable,
) -> Servers {
    let Some(to) = to else {
        return Servers::Any;
    };
    let mut bits = vec![0u64; reg.endpoints.len().div_ceil(64)];
    let prefixes = match to {
        L3Target::Endpoints(selectors) => {
            for (i, ep) in reg.endpoints.iter().enumerate() {
                if selectors.iter().any(|s| s.matches(&ep.labels)) {
                    bits[i / 64] |= 1 << (i % 64);
                }
            }
            let mut out = reserved_blocks(selectors, reg, node, inside);
            out.extend(service_blocks(selectors, reg));
            out
        }
        other => blocks_of(other, reg, node, inside),
    };
    Servers::Named {
        endpoints: bits.into_boxed_slice(),
        prefixes: prefixes.into_boxed_slice(),
    }
}

fn compile(
    policies: &PolicySet,
    reg: &Endpoints,
    fail_closed: &[LabelSelector],
    node: &NodeFacts,
) -> Snapshot {
    let endpoints = reg.endpoints.as_slice();
    // What `world` leaves out, once per compile (every group's scoped rules look it up).
    let inside = prefix_set(cluster_prefixes(reg, node));
    let mut rule_ports: Vec<Box<[PortProto]>> = Vec::new();
    let mut specs = Vec::new();
    for spec in policies.policies.iter().flat_map(|p| &p.specs) {
        if !spec.concerns_egress() {
            continue;
        }
        let mut rule_ids = Vec::with_capacity(spec.egress.len());
        let mut servers = Vec::with_capacity(spec.egress.len());
        for rule in &spec.egress {
            rule_ids.push(rule_ports.len() as u32);
            match rule {
                EgressRule::Fqdn(f) => {
                    rule_ports.push(f.ports.clone().into_boxed_slice());
                    servers.push(Servers::Any);
                }
                EgressRule::Dns(d) => {
                    servers.push(servers_of(d.to.as_ref(), reg, node, &inside));
                }
                EgressRule::Nothing | EgressRule::L3(_) => servers.push(Servers::Any),
            }
        }
        specs.push(FlatSpec {
            selector: &spec.selector,
            rules: &spec.egress,
            deny: &spec.egress_deny,
            default_deny: spec.enforces_egress(),
            rule_ids,
            servers,
        });
    }

    let mut group_of: HashMap<Vec<u32>, u32> = HashMap::new();
    let mut groups = Vec::new();
    let mut entries = Vec::with_capacity(endpoints.len());
    let mut by_ip = Vec::new();
    let mut by_cgroup = HashMap::new();
    let mut deny_all = NO_GROUP;
    for (i, ep) in endpoints.iter().enumerate() {
        let id = EndpointId(i as u32);
        let failed = fail_closed.iter().any(|s| s.matches(&ep.labels));
        let selecting: Vec<u32> = specs
            .iter()
            .enumerate()
            .filter(|(_, s)| s.selector.matches(&ep.labels))
            .map(|(j, _)| j as u32)
            .collect();
        let group = if failed {
            if deny_all == NO_GROUP {
                groups.push(Group {
                    dns: Box::new([]),
                    names: MatcherBuilder::new().build(),
                    fqdn_ids: Box::new([]),
                    fqdn_ports: Box::new([]),
                    l3: None,
                    servers_l3: LpmTable::default(),
                    servers_wildcard: LpmTable::default(),
                    default_deny: true,
                });
                deny_all = (groups.len() - 1) as u32;
            }
            deny_all
        } else if selecting.is_empty() {
            NO_GROUP
        } else {
            *group_of.entry(selecting).or_insert_with_key(|selecting| {
                match compile_group(&specs, selecting, reg, node, &inside) {
                    Some(g) => {
                        groups.push(g);
                        (groups.len() - 1) as u32
                    }
                    None => NO_GROUP,
                }
            })
        };
        entries.push(EndpointEntry {
            name: format!("{}/{}", ep.namespace, ep.name).into_boxed_str(),
            key: EndpointKey::of(&ep.namespace, &ep.name),
            has_ips: !ep.ips.is_empty(),
            group,
        });
        for ip in &ep.ips {
            by_ip.push((ip_key(*ip), id));
        }
        if let Some(cg) = &ep.cgroup {
            by_cgroup.insert(cg.clone().into_boxed_str(), id);
        }
    }
    // Addresses are unique across endpoints (the loader checks); keep the first if not.
    by_ip.sort_by_key(|&(k, _)| k);
    by_ip.dedup_by_key(|&mut (k, _)| k);
    let mut by_key: Vec<_> = entries
        .iter()
        .enumerate()
        .map(|(i, e)| (e.key, EndpointId(i as u32)))
        .collect();
    by_key.sort_unstable_by_key(|&(k, _)| k);
    Snapshot {
        generation: 0,
        policy_id: 0,
        endpoints: entries.into_boxed_slice(),
        by_ip: by_ip.into_boxed_slice(),
        by_key: by_key.into_boxed_slice(),
        by_cgroup,
        groups: groups.into_boxed_slice(),
        deny_all,
        rule_ports: rule_ports.into_boxed_slice(),
        cluster: {
            // Node-local addresses always; loopback unless opened by flag (then the node's
            // own addresses in it are left out too). Registered addresses count wherever
            // they are.
            let loopback = LOOPBACK.map(Cidr::parse);
            let mut prefixes = registered(reg);
            prefixes.extend(NODE_LOCAL.iter().filter_map(|c| {
                let c = Cidr::parse(c).ok()?;
                let is_loopback = loopback.iter().flatten().any(|l| *l == c);
                (!is_loopback || !node.open_loopback).then_some(c)
            }));
            prefixes.extend(remote_nodes(reg));
            prefixes.extend(node.cluster.iter().copied());
            prefixes.extend(node.deny_answers.iter().copied());
            prefixes.extend(node.host.iter().filter(|h| {
                !node.open_loopback || !loopback.iter().flatten().any(|l| l.contains(h))
            }));
            prefixes.sort_unstable();
            prefixes.dedup();
            prefix_set(prefixes)
        },
        inside,
    }
}

/// The node's loopback prefixes.
const LOOPBACK: [&str; 2] = ["127.0.0.0/8", "::1/128"];

/// Addresses a toFQDNs answer never opens, whatever the policy (see
/// [`Snapshot::in_cluster`]): unspecified (`0.0.0.0/8` reaches the node itself on Linux),
/// loopback (unless `--open-loopback-answers`), link-local (most clouds' metadata service,
/// 169.254.169.254), and the other clouds' node services: AWS's metadata over IPv6
/// (`fd00:ec2::254`), Azure's WireServer (168.63.129.16), Alibaba's metadata
/// (100.100.100.200). A workload that must reach one says so with an L3 rule.
const NODE_LOCAL: [&str; 9] = [
    "0.0.0.0/8",
    "::/128",
    "127.0.0.0/8",
    "::1/128",
    "169.254.0.0/16",
    "fe80::/10",
    "fd00:ec2::254/128",
    "168.63.129.16/32",
    "100.100.100.200/32",
];

/// A table of prefixes without ports (a set, looked up by longest match).
fn prefix_set(prefixes: Vec<Cidr>) -> LpmTable {
    LpmTable::new(
        prefixes
            .into_iter()
            .map(|cidr| L3Entry {
                cidr,
                allow: Vec::new(),
                deny: Vec::new(),
            })
            .collect(),
    )
}

/// The prefixes of the `reserved:NAME` selectors among `selectors`: a lone one selects the
/// entity NAME (nothing for an unknown name).
fn reserved_blocks(
    selectors: &[LabelSelector],
    reg: &Endpoints,
    node: &NodeFacts,
    inside: &LpmTable,
) -> Vec<CidrBlock> {
    let entities: Vec<Entity> = selectors
        .iter()
        .filter_map(|s| s.reserved_identity())
        .filter_map(Entity::reserved)
        .collect();
    if entities.is_empty() {
        return Vec::new();
    }
    blocks_of(&L3Target::Entities(entities), reg, node, inside)
}

/// The host prefixes of the services (addresses and backends) whose pods one of `selectors`
/// all selects ([`LabelSelector::selects_every`]).
fn service_blocks<'r>(
    selectors: &'r [LabelSelector],
    reg: &'r Endpoints,
) -> impl Iterator<Item = CidrBlock> + 'r {
    reg.services
        .iter()
        .filter(|svc| {
            let Some(pods) = &svc.selector else {
                return false;
            };
            selectors.iter().any(|s| s.selects_every(pods))
        })
        .flat_map(|svc| svc.addresses())
        .map(|ip| CidrBlock::new(Cidr::host(ip)))
}

/// The registered endpoints' and services' addresses: ClusterIPs, and the backends of a
/// service with a selector (its pods). A selector-less service's backends are whatever its
/// EndpointSlices list, often outside the cluster: not `cluster`, still `world`.
fn registered(reg: &Endpoints) -> Vec<Cidr> {
    let services = reg.services.iter().flat_map(|svc| {
        let pods = svc.selector.is_some().then_some(&svc.backends);
        svc.ips.iter().chain(pods.into_iter().flatten()).copied()
    });
    reg.endpoints
        .iter()
        .flat_map(|ep| ep.ips.iter().copied())
        .chain(services)
        .map(Cidr::host)
        .collect()
}

/// The cluster's other nodes' addresses (`remote-node`).
fn remote_nodes(reg: &Endpoints) -> Vec<Cidr> {
    reg.nodes
        .iter()
        .flat_map(|n| n.ips.iter().copied())
        .map(Cidr::host)
        .collect()
}

/// Inside the cluster: the registered endpoints and services, the other nodes, the cluster
/// ranges, the node itself (what `world` leaves out).
fn cluster_prefixes(reg: &Endpoints, node: &NodeFacts) -> Vec<Cidr> {
    let mut all = registered(reg);
    all.extend(remote_nodes(reg));
    all.extend(node.cluster.iter().copied());
    all.extend(node.host.iter().copied());
    minimal(all)
}

/// `prefixes` less the ones another of them contains, sorted: with `--cluster-cidr` given,
/// every pod inside the pod range is one prefix (the range), not one per pod, in the cluster
/// table ([`Snapshot::inside`]) and so in the datapath's cluster map.
/// O(n × r) for r prefixes shorter than a host's (the ranges: a few).
fn minimal(mut prefixes: Vec<Cidr>) -> Vec<Cidr> {
    prefixes.sort_unstable_by_key(|c| (c.len, *c));
    prefixes.dedup();
    let mut ranges: Vec<Cidr> = Vec::new();
    prefixes.retain(|c| {
        if ranges.iter().any(|r| r.contains(c)) {
            return false;
        }
        if c.len < if c.addr.is_ipv4() { 32 } else { 128 } {
            ranges.push(*c);
        }
        true
    });
    prefixes.sort_unstable();
    prefixes
}

/// The prefixes an L3 target stands for: CIDR blocks scoped to the addresses outside the
/// cluster, every address for no selector, the host prefixes of the registered endpoints a
/// `toEndpoints` selects. `inside`: the cluster's prefixes ([`cluster_prefixes`]).
fn blocks_of(
    to: &L3Target,
    reg: &Endpoints,
    node: &NodeFacts,
    inside: &LpmTable,
) -> Vec<CidrBlock> {
    let scoped = |cidr, scope| CidrBlock {
        scope,
        ..CidrBlock::new(cidr)
    };
    // `world` and `cluster` are every address on one side of the cluster's boundary: one
    // scoped prefix per family, not the cluster's addresses as exceptions (one per pod
    // without `--cluster-cidr`, in every enforced endpoint's L3 entries).
    let entity = |e: &Entity| match e {
        Entity::All => vec![CidrBlock::new(Cidr::ALL4), CidrBlock::new(Cidr::ALL6)],
        Entity::World => vec![
            scoped(Cidr::ALL4, Scope::Outside),
            scoped(Cidr::ALL6, Scope::Outside),
        ],
        Entity::WorldV4 => vec![scoped(Cidr::ALL4, Scope::Outside)],
        Entity::WorldV6 => vec![scoped(Cidr::ALL6, Scope::Outside)],
        Entity::Cluster => vec![
            scoped(Cidr::ALL4, Scope::Inside),
            scoped(Cidr::ALL6, Scope::Inside),
        ],
        Entity::Host => node.host.iter().copied().map(CidrBlock::new).collect(),
        Entity::KubeApiserver => node
            .kube_apiserver
            .iter()
            .copied()
            .map(CidrBlock::new)
            .collect(),
        Entity::RemoteNode => remote_nodes(reg).into_iter().map(CidrBlock::new).collect(),
        Entity::Unknown => Vec::new(),
    };
    match to {
        L3Target::Entities(entities) => entities.iter().flat_map(entity).collect(),
        L3Target::Any => vec![CidrBlock::new(Cidr::ALL4), CidrBlock::new(Cidr::ALL6)],
        // As in Cilium, CIDR rules select only destinations outside the cluster and not the
        // host: a pod, a service address, a node has an identity of its own, reached only
        // through `toEndpoints`, `toServices` or `toEntities`. So a block is scoped as `world`
        // is (allow and deny alike), and a block inside the cluster is none.
        // One exception: a block inside the node's own addresses (`host`: loopback,
        // `--node-ip`) is kept as written. It names the node on purpose, and dnsfence's
        // endpoints include host processes (by cgroup), which Cilium's do not.
        L3Target::Cidrs(blocks) => blocks
            .iter()
            .filter_map(|b| {
                if node.host.iter().any(|h| h.contains(&b.cidr)) {
                    Some(b.clone())
                } else if inside.covering(&b.cidr).is_some() {
                    None
                } else {
                    Some(CidrBlock {
                        scope: Scope::Outside,
                        ..b.clone()
                    })
                }
            })
            .collect(),
        L3Target::Services(refs) => reg
            .services
            .iter()
            .filter(|svc| refs.iter().any(|r| r.names(svc)))
            .flat_map(|svc| svc.addresses())
            .map(|ip| CidrBlock::new(Cidr::host(ip)))
            .collect(),
        L3Target::Endpoints(selectors) => {
            let mut out = reserved_blocks(selectors, reg, node, inside);
            out.extend(
                reg.endpoints
                    .iter()
                    .filter(|ep| selectors.iter().any(|s| s.matches(&ep.labels)))
                    .flat_map(|ep| ep.ips.iter().map(|&ip| CidrBlock::new(Cidr::host(ip)))),
            );
            out.extend(service_blocks(selectors, reg));
            out
        }
    }
}

/// The group of the endpoints `selecting` selects; `None` when nothing restricts them (no spec
/// asks for default deny, and none has an `egressDeny` or DNS rule): they stay unrestricted.
fn compile_group(
    specs: &[FlatSpec<'_>],
    selecting: &[u32],
    reg: &Endpoints,
    node: &NodeFacts,
    inside: &LpmTable,
) -> Option<Group> {
    let default_deny = selecting.iter().any(|&s| specs[s as usize].default_deny);
    let restricts = |s: &FlatSpec<'_>| {
        !s.deny.is_empty() || s.rules.iter().any(|r| matches!(r, EgressRule::Dns(_)))
    };
    if !default_deny && !selecting.iter().any(|&s| restricts(&specs[s as usize])) {
        return None;
    }
    let mut l3_allow = Vec::new();
    let mut l3_deny = Vec::new();
    let mut wildcarding = Vec::new();
    for &s in selecting {
        let spec = &specs[s as usize];
        for rule in spec.rules {
            if let EgressRule::L3(r) = rule {
                let blocks = blocks_of(&r.to, reg, node, inside);
                let ports: Vec<PortProto> = r
                    .ports
                    .iter()
                    .filter(|p| {
                        p.proto == PortProtocol::Every || p.port == 0 || p.port == p.end_port
                    })
                    .copied()
                    .collect();
                if !ports.is_empty() && !matches!(r.to, L3Target::Services(_)) {
                    wildcarding.push((blocks.clone(), ports));
                }
                l3_allow.push((blocks, r.ports.clone()));
            }
        }
        for r in spec.deny {
            l3_deny.push((blocks_of(&r.to, reg, node, inside), r.ports.clone()));
        }
    }
    // (ports, servers) → (allows every name, its patterns)
    let mut index: HashMap<(Vec<PortProto>, Servers), usize> = HashMap::new();
    let mut dns: Vec<(Vec<PortProto>, Servers, bool, Vec<Pattern>)> = Vec::new();
    // toFQDNs selectors by local rule index, and the rules' ids.
    let mut fqdn: Vec<(Pattern, usize)> = Vec::new();
    let mut fqdn_ids: Vec<RuleId> = Vec::new();
    let mut fqdn_local: HashMap<u32, usize> = HashMap::new();
    let mut fqdn_ports = Vec::new();
    for &s in selecting {
        let spec = &specs[s as usize];
        for (r, rule) in spec.rules.iter().enumerate() {
            match rule {
                EgressRule::Nothing | EgressRule::L3(_) => {}
                EgressRule::Fqdn(f) => {
                    let id = RuleId(spec.rule_ids[r]);
                    let k = *fqdn_local.entry(id.0).or_insert_with(|| {
                        fqdn_ids.push(id);
                        fqdn_ids.len() - 1
                    });
                    for p in &f.selectors {
                        fqdn.push((p.clone(), k));
                    }
                    if f.ports.is_empty() {
                        fqdn_ports.push(PortProto::ALL);
                    } else {
                        fqdn_ports.extend_from_slice(&f.ports);
                    }
                }
                EgressRule::Dns(d) => {
                    for ports in &d.ports {
                        let key = (ports.ports.clone(), spec.servers[r].clone());
                        let slot = *index.entry(key).or_insert_with_key(|(p, sv)| {
                            dns.push((p.clone(), sv.clone(), false, Vec::new()));
                            dns.len() - 1
                        });
                        let entry = &mut dns[slot];
                        if ports.names.is_empty() {
                            entry.2 = true;
                        }
                        entry.3.extend(ports.names.iter().cloned());
                    }
                }
            }
        }
    }
    let mut names = MatcherBuilder::new();
    for (i, (_, _, all, patterns)) in dns.iter().enumerate() {
        // `dns: []` allows every name: its patterns need no walk.
        if !*all {
            for p in patterns {
                names.add(p.clone(), RuleId(i as u32));
            }
        }
    }
    for (p, k) in fqdn {
        names.add(p, RuleId((dns.len() + k) as u32));
    }
    Some(Group {
        default_deny,
        dns: dns
            .into_iter()
            .map(|(ports, servers, all, _)| DnsEntry {
                ports: ports.into_boxed_slice(),
                servers,
                names: if all { Names::All } else { Names::Listed },
            })
            .collect(),
        names: names.build(),
        fqdn_ids: fqdn_ids.into_boxed_slice(),
        fqdn_ports: {
            fqdn_ports.sort_unstable();
            fqdn_ports.dedup();
            fqdn_ports.into_boxed_slice()
        },
        servers_l3: LpmTable::new(compile_table(&l3_allow, &l3_deny)),
        servers_wildcard: LpmTable::new(compile_table(&wildcarding, &[])),
        l3: (!default_deny).then(|| {
            // Default allow: every address, less what egressDeny denies.
            l3_allow.push((blocks_of(&L3Target::Any, reg, node, inside), Vec::new()));
            LpmTable::new(compile_table(&l3_allow, &l3_deny))
        }),
    })
}

#[cfg(test)]
mod key_tests {
    use super::EndpointKey;

    #[test]
    fn endpoint_keys_are_sha256_prefixes() {
        // `printf default/client | sha256sum`: 6844d0909128ccbf...
        let key = EndpointKey::of("default", "client");
        assert_eq!(key.0, 0x6844_d090_9128_ccbf);
        assert_ne!(key, EndpointKey::of("default", "client2"));
    }
}
