//! IP prefixes (`toCIDR`, `toCIDRSet`) and the disjoint prefix table the datapath looks up.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::policy::PortProto;

/// An IP prefix with its host bits cleared. IPv4 prefixes stay IPv4.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct Cidr {
    /// The network address.
    pub addr: IpAddr,
    /// The prefix length (0-32 for IPv4, 0-128 for IPv6).
    pub len: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8`, `2001:db8::/32`, or a bare address (a host prefix). Host bits set
    /// in the address are an error (`10.0.0.1/8` is not a network), as Cilium's API rejects.
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (addr, len) = match text.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{text:?} is not an IP prefix"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|&l| l <= max)
                .ok_or_else(|| format!("{text:?}: prefix length must be 0 to {max}"))?,
        };
        let cidr = Cidr { addr, len }.normalised();
        if cidr.addr != addr {
            return Err(format!(
                "{text:?} has host bits set (the network is {})",
                cidr
            ));
        }
        // An IPv4-mapped IPv6 prefix is the IPv4 prefix it maps (destinations are judged
        // that way: `host` maps them too), so it decides for IPv4 here and in the datapath.
        if let (IpAddr::V6(v6), true) = (cidr.addr, cidr.len >= 96)
            && let Some(v4) = v6.to_ipv4_mapped()
        {
            return Ok(Cidr {
                addr: IpAddr::V4(v4),
                len: cidr.len - 96,
            });
        }
        Ok(cidr)
    }

    /// Parses one address (`192.0.2.7`, or a host prefix `192.0.2.7/32`) as a host prefix;
    /// a shorter prefix is an error (the node's own addresses: `--node-ip`).
    pub fn parse_host(text: &str) -> Result<Cidr, String> {
        let cidr = Cidr::parse(text)?;
        if cidr.len != if cidr.addr.is_ipv4() { 32 } else { 128 } {
            return Err(format!(
                "{text:?} is a prefix: give the node's addresses one by one"
            ));
        }
        Ok(cidr)
    }

    /// Every IPv4 address.
    pub const ALL4: Cidr = Cidr {
        addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        len: 0,
    };
    /// Every IPv6 address.
    pub const ALL6: Cidr = Cidr {
        addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        len: 0,
    };

    /// A host prefix.
    pub fn host(ip: IpAddr) -> Cidr {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        Cidr {
            addr: ip,
            len: if ip.is_ipv4() { 32 } else { 128 },
        }
    }

    fn bits(&self) -> (u128, u32) {
        match self.addr {
            IpAddr::V4(v4) => (u128::from(u32::from(v4)) << 96, 32),
            IpAddr::V6(v6) => (u128::from(v6), 128),
        }
    }

    fn mask(len: u8) -> u128 {
        if len == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(len))
        }
    }

    fn normalised(self) -> Cidr {
        let (bits, width) = self.bits();
        let kept = bits & Cidr::mask(self.len);
        let addr = match self.addr {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from((kept >> 96) as u32)),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(kept)),
        };
        let _ = width;
        Cidr {
            addr,
            len: self.len,
        }
    }

    /// Whether `self` contains `other` (same family, at most as long, same leading bits).
    pub fn contains(&self, other: &Cidr) -> bool {
        if self.addr.is_ipv4() != other.addr.is_ipv4() || self.len > other.len {
            return false;
        }
        let mask = Cidr::mask(self.len);
        (self.bits().0 & mask) == (other.bits().0 & mask)
    }

    /// Whether `self` contains the address `ip` (IPv4-mapped IPv6 as IPv4).
    pub fn contains_ip(&self, ip: IpAddr) -> bool {
        self.contains(&Cidr::host(ip))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// A `toEntities` name (Cilium's reserved identities).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Entity {
    /// `all`: every address.
    All,
    /// `world`: every address outside the cluster (not the node, not a registered endpoint,
    /// not a `--cluster-cidr`).
    World,
    /// `world-ipv4`.
    WorldV4,
    /// `world-ipv6`.
    WorldV6,
    /// `cluster`: the node, the other nodes, the registered endpoints and services, and the
    /// `--cluster-cidr` prefixes.
    Cluster,
    /// `host`: the node itself (loopback and `--node-ip`).
    Host,
    /// `kube-apiserver`: the `--kube-apiserver` prefixes (nothing without them).
    KubeApiserver,
    /// `remote-node`: the other nodes of the cluster (the registry's `nodes`, which the
    /// Kubernetes source fills; nothing without them).
    RemoteNode,
    /// `init`, `health`, `unmanaged`, `ingress`: identities dnsfence cannot tell; the rule
    /// allows nothing for them (fail closed).
    Unknown,
}

impl Entity {
    /// Parses an entity name; None for a name Cilium does not define.
    pub fn parse(name: &str) -> Option<Entity> {
        Some(match name {
            "all" => Entity::All,
            "world" => Entity::World,
            "world-ipv4" => Entity::WorldV4,
            "world-ipv6" => Entity::WorldV6,
            "cluster" => Entity::Cluster,
            "host" => Entity::Host,
            "kube-apiserver" => Entity::KubeApiserver,
            "remote-node" => Entity::RemoteNode,
            "init" | "health" | "unmanaged" | "ingress" => Entity::Unknown,
            _ => return None,
        })
    }
}

impl Entity {
    /// The entity a `reserved:NAME` label selects in an endpoint selector (Cilium's reserved
    /// identities carry these labels); None for a name that is no reserved identity.
    pub fn reserved(name: &str) -> Option<Entity> {
        match name {
            "host" | "world" | "world-ipv4" | "world-ipv6" | "kube-apiserver" | "remote-node"
            | "init" | "health" | "unmanaged" | "ingress" => Entity::parse(name),
            _ => None,
        }
    }
}

/// What the node knows of itself and its cluster, for `toEntities` (flags of the agent).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct NodeFacts {
    /// `--cluster-cidr`: pod and service ranges of the cluster.
    pub cluster: Vec<Cidr>,
    /// The node's own addresses: loopback, the unspecified addresses (a datagram sent to
    /// 0.0.0.0 or `::` is delivered to the node itself, over loopback), plus `--node-ip`.
    pub host: Vec<Cidr>,
    /// `--kube-apiserver`.
    pub kube_apiserver: Vec<Cidr>,
    /// `--open-loopback-answers`: a toFQDNs answer in the node's loopback opens it (by
    /// default it opens nothing, like the other node-local addresses: see
    /// [`crate::Snapshot::in_cluster`]).
    pub open_loopback: bool,
    /// `--deny-answer-cidr`: ranges a toFQDNs answer never opens, besides the cluster's and
    /// the node-local ones (networks that must not be reachable by DNS rebinding: an
    /// on-premises range, another cloud's metadata address). An L3 rule still opens them.
    pub deny_answers: Vec<Cidr>,
}

impl Default for NodeFacts {
    fn default() -> NodeFacts {
        NodeFacts {
            cluster: Vec::new(),
            host: vec![
                Cidr::parse("127.0.0.0/8").expect("valid"),
                Cidr::parse("::1/128").expect("valid"),
                Cidr::parse("0.0.0.0/32").expect("valid"),
                Cidr::parse("::/128").expect("valid"),
            ],
            kube_apiserver: Vec::new(),
            open_loopback: false,
            deny_answers: Vec::new(),
        }
    }
}

/// Which addresses of a prefix a rule's block applies to: Cilium's `world` and CIDR rules
/// select only destinations outside the cluster, `cluster` only those inside it. The
/// datapath keeps the cluster's addresses once, in a map of their own (`df_cluster`), and
/// looks there only when a matching port entry is scoped, so a `world` or CIDR rule costs a
/// few L3 entries per endpoint whatever the size of the cluster.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord, Default)]
pub enum Scope {
    /// Every address of the prefix.
    #[default]
    Any,
    /// Only addresses outside the cluster (not [`crate::Snapshot::inside`]).
    Outside,
    /// Only addresses inside the cluster.
    Inside,
}

impl Scope {
    /// As a bit set: Outside 1, Inside 2, Any both.
    fn bits(self) -> u8 {
        match self {
            Scope::Any => 3,
            Scope::Outside => 1,
            Scope::Inside => 2,
        }
    }

    /// Whether the scope holds an address that is (`inside`) or is not in the cluster.
    #[inline]
    pub fn holds(self, inside: bool) -> bool {
        match self {
            Scope::Any => true,
            Scope::Outside => !inside,
            Scope::Inside => inside,
        }
    }
}

/// A `toCIDRSet` entry (or a `toCIDR` one, without exceptions).
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct CidrBlock {
    /// The prefix.
    pub cidr: Cidr,
    /// `except`: prefixes inside it that the block does not cover.
    pub except: Vec<Cidr>,
    /// Which of the prefix's addresses it covers: inside or outside the cluster, or all.
    pub scope: Scope,
}

impl CidrBlock {
    /// Every address of `cidr`.
    pub fn new(cidr: Cidr) -> CidrBlock {
        CidrBlock {
            cidr,
            except: Vec::new(),
            scope: Scope::Any,
        }
    }

    /// Whether the block covers every address of `p` (p inside the prefix and inside no
    /// exception), as far as the prefixes go (its scope aside). For prefixes of one disjoint
    /// table this is also "covers any address of p".
    pub fn covers(&self, p: &Cidr) -> bool {
        self.cidr.contains(p) && !self.except.iter().any(|e| e.contains(p))
    }
}

/// A port entry of an L3 table entry: the ports, and which of the prefix's addresses they
/// apply to.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct L3Port {
    /// Inside or outside the cluster, or both.
    pub scope: Scope,
    /// The ports and protocol.
    pub ports: PortProto,
}

impl From<PortProto> for L3Port {
    fn from(ports: PortProto) -> L3Port {
        L3Port {
            scope: Scope::Any,
            ports,
        }
    }
}

/// One entry of an endpoint's L3 table: for every address whose longest matching prefix is
/// `cidr`, the ports allowed and the ports denied (`egressDeny` wins), each for the
/// addresses of its scope.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct L3Entry {
    /// The prefix.
    pub cidr: Cidr,
    /// Ports allowed (an L3 rule without `toPorts` or `icmps` contributes
    /// [`PortProto::EVERY`]).
    pub allow: Vec<L3Port>,
    /// Ports denied.
    pub deny: Vec<L3Port>,
}

/// Compiles allow and deny rules (each: blocks and ports, empty ports = all) into a table of
/// prefixes where the longest match of any address gives its verdict: every rule prefix and
/// exception becomes an entry carrying the ports of every rule that covers it.
pub fn compile_table(
    allow: &[(Vec<CidrBlock>, Vec<PortProto>)],
    deny: &[(Vec<CidrBlock>, Vec<PortProto>)],
) -> Vec<L3Entry> {
    let mut prefixes: Vec<Cidr> = allow
        .iter()
        .chain(deny)
        .flat_map(|(blocks, _)| blocks)
        .flat_map(|b| std::iter::once(b.cidr).chain(b.except.iter().copied()))
        .collect();
    prefixes.sort_unstable();
    prefixes.dedup();
    let allow_index = BlockIndex::new(allow);
    let deny_index = BlockIndex::new(deny);
    prefixes
        .into_iter()
        .map(|cidr| L3Entry {
            allow: allow_index.ports_covering(allow, &cidr),
            deny: deny_index.ports_covering(deny, &cidr),
            cidr,
        })
        .collect()
}

impl L3Entry {
    /// What the entry says of the traffic `covers` picks among its port entries, for an
    /// address that `inside` says is in the cluster or not (asked at most once, and only when
    /// a scoped entry covers the traffic): `Some(false)` a deny covers it (deny wins),
    /// `Some(true)` an allow does, None neither.
    #[inline]
    pub fn judge(
        &self,
        covers: impl Fn(&PortProto) -> bool,
        inside: impl FnOnce() -> bool,
    ) -> Option<bool> {
        let mut inside = Some(inside);
        let mut known = None;
        let mut applies = |p: &L3Port| {
            covers(&p.ports)
                && (p.scope == Scope::Any
                    || p.scope
                        .holds(*known.get_or_insert_with(|| inside.take().is_none_or(|f| f()))))
        };
        if self.deny.iter().any(&mut applies) {
            Some(false)
        } else if self.allow.iter().any(&mut applies) {
            Some(true)
        } else {
            None
        }
    }
}

/// An L3 table indexed for longest-prefix lookups: one hash probe per distinct prefix length
/// of the address's family, longest first (a table usually has a few lengths), instead of a
/// scan of every entry. Lookups do not allocate.
#[derive(Debug, Default)]
pub struct LpmTable {
    /// (is IPv4, length, network bits → entry), longest first.
    by_len: Vec<(bool, u8, std::collections::HashMap<u128, u32, Fast>)>,
    entries: Vec<L3Entry>,
}

impl LpmTable {
    /// Indexes `entries` (prefixes distinct, as [`compile_table`] gives them).
    pub fn new(entries: Vec<L3Entry>) -> LpmTable {
        let mut by_len: Vec<(bool, u8, std::collections::HashMap<u128, u32, Fast>)> = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            let v4 = e.cidr.addr.is_ipv4();
            let slot = match by_len
                .iter()
                .position(|(f, len, _)| *f == v4 && *len == e.cidr.len)
            {
                Some(slot) => slot,
                None => {
                    by_len.push((v4, e.cidr.len, std::collections::HashMap::default()));
                    by_len.len() - 1
                }
            };
            by_len[slot].2.insert(e.cidr.bits().0, i as u32);
        }
        by_len.sort_by_key(|b| std::cmp::Reverse(b.1));
        LpmTable { by_len, entries }
    }

    /// Whether the table has no entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries, in the order given.
    pub fn entries(&self) -> &[L3Entry] {
        &self.entries
    }

    /// The entry of the longest prefix that contains all of `p` (a prefix as long as `p` or
    /// shorter).
    pub fn covering(&self, p: &Cidr) -> Option<&L3Entry> {
        let (bits, _) = p.bits();
        let v4 = p.addr.is_ipv4();
        self.by_len
            .iter()
            .filter(|(f, len, _)| *f == v4 && *len <= p.len)
            .find_map(|(_, len, map)| map.get(&(bits & Cidr::mask(*len))))
            .map(|&i| &self.entries[i as usize])
    }

    /// The entry of the longest prefix containing `ip` (IPv4-mapped IPv6 as IPv4).
    pub fn lookup(&self, ip: IpAddr) -> Option<&L3Entry> {
        let host = Cidr::host(ip);
        let (bits, _) = host.bits();
        let v4 = host.addr.is_ipv4();
        self.by_len
            .iter()
            .filter(|(f, _, _)| *f == v4)
            .find_map(|(_, len, map)| map.get(&(bits & Cidr::mask(*len))))
            .map(|&i| &self.entries[i as usize])
    }
}

/// The blocks of a rule list by their prefix, so the blocks containing a prefix are found by
/// looking up its ancestors (at most 33 or 129 lookups) instead of scanning every block: a
/// table of n prefixes compiles in O(n × width), not O(n²).
/// The compile-time tables' hasher: their keys are prefixes from policy files and the
/// registry, not from packets.
type Fast = foldhash::fast::RandomState;

/// A prefix as a hash key: (is IPv4, length, network bits).
type PrefixKey = (bool, u8, u128);

struct BlockIndex {
    /// (is IPv4, length, network bits) -> (rule, block) indices.
    by_prefix: std::collections::HashMap<PrefixKey, Vec<(usize, usize)>, Fast>,
    /// Every block's exceptions, as (rule, block, is IPv4, length, network bits): whether a
    /// block's exception contains a prefix is one lookup per ancestor of the prefix, not a scan
    /// of the block's exceptions (which leave out the cluster: one per pod without
    /// `--cluster-cidr`, so a scan per prefix made a group's table O(pods²) to compile).
    excepts: std::collections::HashSet<(usize, usize, bool, u8, u128), Fast>,
}

impl BlockIndex {
    fn new(rules: &[(Vec<CidrBlock>, Vec<PortProto>)]) -> BlockIndex {
        let mut by_prefix: std::collections::HashMap<_, Vec<_>, Fast> =
            std::collections::HashMap::default();
        let mut excepts = std::collections::HashSet::default();
        for (r, (blocks, _)) in rules.iter().enumerate() {
            for (b, block) in blocks.iter().enumerate() {
                let c = block.cidr;
                by_prefix
                    .entry((c.addr.is_ipv4(), c.len, c.bits().0))
                    .or_default()
                    .push((r, b));
                for e in &block.except {
                    excepts.insert((r, b, e.addr.is_ipv4(), e.len, e.bits().0));
                }
            }
        }
        BlockIndex { by_prefix, excepts }
    }

    /// Whether block `b` of rule `r`, which contains `p`, has an exception containing `p`.
    fn excepted(&self, r: usize, b: usize, p: &Cidr) -> bool {
        let (bits, _) = p.bits();
        let v4 = p.addr.is_ipv4();
        (0..=p.len).any(|len| {
            self.excepts
                .contains(&(r, b, v4, len, bits & Cidr::mask(len)))
        })
    }

    /// The ports of every rule with a block that covers `p` (inside it, in no exception), each
    /// scoped to the addresses the rule's covering blocks take (a rule covering `p` through a
    /// `world` block and a `cluster` one covers all of it).
    fn ports_covering(&self, rules: &[(Vec<CidrBlock>, Vec<PortProto>)], p: &Cidr) -> Vec<L3Port> {
        let (bits, _) = p.bits();
        // (rule, scope bits)
        let mut covering: Vec<(usize, u8)> = Vec::new();
        for len in 0..=p.len {
            let key = (p.addr.is_ipv4(), len, bits & Cidr::mask(len));
            for &(r, b) in self.by_prefix.get(&key).into_iter().flatten() {
                // The block contains `p` (it is `p` or an ancestor of it).
                if self.excepted(r, b, p) {
                    continue;
                }
                let scope = rules[r].0[b].scope.bits();
                match covering.iter_mut().find(|(c, _)| *c == r) {
                    Some((_, m)) => *m |= scope,
                    None => covering.push((r, scope)),
                }
            }
        }
        covering.sort_unstable();
        union_scoped(
            covering
                .into_iter()
                .map(|(r, m)| (m, rules[r].1.as_slice())),
        )
    }
}

/// The ports a set of matching rules allows together: the sorted union of their
/// ports, where a rule without ports allows everything, ICMP included (the union is then
/// `EVERY`).
fn union_ports<'a>(rules: impl Iterator<Item = &'a [PortProto]>) -> Vec<PortProto> {
    let mut out: Vec<PortProto> = Vec::new();
    for ports in rules {
        if ports.is_empty() {
            return vec![PortProto::EVERY];
        }
        out.extend_from_slice(ports);
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// [`union_ports`] per scope, for rules given as (scope bits, ports): sorted by scope, then
/// ports, and as few as the scopes allow (the datapath holds `DF_MAX_L3_SPECS` per prefix):
/// a port on both sides of the cluster's boundary is one unscoped port, and a scoped port
/// inside an unscoped one is left out.
fn union_scoped<'a>(rules: impl Iterator<Item = (u8, &'a [PortProto])>) -> Vec<L3Port> {
    let rules: Vec<(u8, &[PortProto])> = rules.collect();
    let of = |scope: Scope| {
        union_ports(
            rules
                .iter()
                .filter(|(m, _)| *m == scope.bits())
                .map(|(_, p)| *p),
        )
    };
    let (mut any, mut outside, mut inside) =
        (of(Scope::Any), of(Scope::Outside), of(Scope::Inside));
    any.extend(outside.iter().filter(|p| inside.contains(p)));
    if any.contains(&PortProto::EVERY) {
        any = vec![PortProto::EVERY];
    }
    any.sort_unstable();
    any.dedup();
    let within = |p: &PortProto| {
        any.iter()
            .any(|a| a.port <= p.port && p.end_port <= a.end_port && a.proto.includes(p.proto))
    };
    outside.retain(|p| !within(p));
    inside.retain(|p| !within(p));
    let scoped =
        |scope, ports: Vec<PortProto>| ports.into_iter().map(move |ports| L3Port { scope, ports });
    scoped(Scope::Any, any.clone())
        .chain(scoped(Scope::Outside, outside))
        .chain(scoped(Scope::Inside, inside))
        .collect()
}

#[cfg(test)]
mod tests {
    /// The naive definition the index must agree with: every rule whose blocks cover `p`,
    /// in the scopes of the blocks that do.
    fn naive(rules: &[(Vec<CidrBlock>, Vec<PortProto>)], p: &Cidr) -> Vec<L3Port> {
        super::union_scoped(rules.iter().filter_map(|(blocks, ports)| {
            let scope = blocks
                .iter()
                .filter(|b| b.covers(p))
                .fold(0, |m, b| m | b.scope.bits());
            (scope != 0).then_some((scope, ports.as_slice()))
        }))
    }

    #[test]
    fn the_index_agrees_with_a_scan_of_every_block() {
        use crate::policy::PortProtocol;
        // Pseudo-random nested and overlapping prefixes of both families, with exceptions.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..30 {
            let mut rules = Vec::new();
            for r in 0..6 {
                let mut blocks = Vec::new();
                for _ in 0..(next() % 5) {
                    let v4 = next() % 3 != 0;
                    let len = (next() % if v4 { 33 } else { 129 }) as u8;
                    let raw = u128::from(next()) << 64 | u128::from(next());
                    let addr = if v4 {
                        IpAddr::V4(Ipv4Addr::from((raw >> 96) as u32 & 0x0a0f_ffff))
                    } else {
                        IpAddr::V6(Ipv6Addr::from(raw & !(u128::MAX >> 20) | 0x2001 << 112))
                    };
                    let cidr = Cidr { addr, len }.normalised();
                    let except = (0..next() % 3)
                        .map(|_| {
                            Cidr {
                                addr,
                                len: (len + (next() % 8) as u8).min(if v4 { 32 } else { 128 }),
                            }
                            .normalised()
                        })
                        .collect();
                    let scope = [Scope::Any, Scope::Outside, Scope::Inside][(next() % 3) as usize];
                    blocks.push(CidrBlock {
                        cidr,
                        except,
                        scope,
                    });
                }
                let ports = if r % 3 == 0 {
                    vec![]
                } else {
                    vec![PortProto {
                        port: (r * 100 + round) as u16,
                        end_port: (r * 100 + round) as u16,
                        proto: PortProtocol::Tcp,
                    }]
                };
                rules.push((blocks, ports));
            }
            let (allow, deny) = rules.split_at(4);
            for e in compile_table(allow, deny) {
                assert_eq!(e.allow, naive(allow, &e.cidr), "allow at {}", e.cidr);
                assert_eq!(e.deny, naive(deny, &e.cidr), "deny at {}", e.cidr);
            }
        }
    }

    use super::*;
    use crate::policy::PortProtocol;

    fn c(s: &str) -> Cidr {
        Cidr::parse(s).unwrap()
    }

    #[test]
    fn parse_and_contain() {
        assert_eq!(c("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(c("1.2.3.4"), Cidr::host("1.2.3.4".parse().unwrap()));
        assert_eq!(c("2001:db8::/32").len, 32);
        assert!(Cidr::parse("10.0.0.1/8").unwrap_err().contains("host bits"));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("nope").is_err());
        assert!(c("10.0.0.0/8").contains(&c("10.1.0.0/16")));
        assert!(!c("10.1.0.0/16").contains(&c("10.0.0.0/8")));
        assert!(!c("0.0.0.0/0").contains(&c("::/0")));
        assert!(c("0.0.0.0/0").contains_ip("::ffff:1.2.3.4".parse().unwrap()));
        assert_eq!(
            c("::ffff:10.0.0.0/104"),
            c("10.0.0.0/8"),
            "mapped prefixes are IPv4"
        );
        assert_eq!(c("::ffff:1.2.3.4"), c("1.2.3.4/32"));
        assert!(c("::ffff:10.0.0.0/104").contains_ip("10.1.2.3".parse().unwrap()));
        assert_eq!(c("::ffff:0:0/96"), Cidr::ALL4);
        assert!(c("::/80").addr.is_ipv6());
    }

    #[test]
    fn longest_match_carries_every_covering_rule_minus_exceptions() {
        let p443 = PortProto {
            port: 443,
            end_port: 443,
            proto: PortProtocol::Tcp,
        };
        let p53 = PortProto {
            port: 53,
            end_port: 53,
            proto: PortProtocol::Udp,
        };
        let allow = vec![
            (
                vec![CidrBlock {
                    except: vec![c("10.1.0.0/16")],
                    ..CidrBlock::new(c("10.0.0.0/8"))
                }],
                vec![p443],
            ),
            (vec![CidrBlock::new(c("10.1.2.0/24"))], vec![p53]),
        ];
        let deny = vec![(vec![CidrBlock::new(c("10.9.0.0/16"))], vec![])];
        let t = compile_table(&allow, &deny);
        let at = |s: &str| t.iter().find(|e| e.cidr == c(s)).unwrap().clone();
        assert_eq!(at("10.0.0.0/8").allow, vec![p443.into()]);
        assert_eq!(
            at("10.1.0.0/16").allow,
            vec![],
            "the exception shadows the parent"
        );
        assert_eq!(
            at("10.1.2.0/24").allow,
            vec![p53.into()],
            "not the excepted rule's 443"
        );
        assert_eq!(at("10.9.0.0/16").allow, vec![p443.into()], "inherits 443");
        assert_eq!(at("10.9.0.0/16").deny, vec![PortProto::EVERY.into()]);
    }

    #[test]
    fn scoped_ports_apply_only_on_their_side_of_the_cluster() {
        use crate::policy::Proto;
        let tcp = |port| PortProto {
            port,
            end_port: port,
            proto: PortProtocol::Tcp,
        };
        let scoped = |cidr, scope| CidrBlock {
            scope,
            ..CidrBlock::new(cidr)
        };
        let allow = vec![
            // world:443, cluster:5432, and one rule taking 10/8 on both sides (every port).
            (vec![scoped(Cidr::ALL4, Scope::Outside)], vec![tcp(443)]),
            (vec![scoped(Cidr::ALL4, Scope::Inside)], vec![tcp(5432)]),
            (
                vec![
                    scoped(c("10.0.0.0/8"), Scope::Outside),
                    scoped(c("10.0.0.0/8"), Scope::Inside),
                ],
                vec![],
            ),
        ];
        let deny = vec![(
            vec![scoped(c("10.9.0.0/16"), Scope::Outside)],
            vec![tcp(443)],
        )];
        let t = LpmTable::new(compile_table(&allow, &deny));
        let judge = |ip: &str, port, inside: bool| {
            t.lookup(ip.parse().unwrap())
                .and_then(|e| e.judge(|p| p.covers(port, Proto::Tcp), || inside))
        };
        assert_eq!(judge("1.1.1.1", 443, false), Some(true));
        assert_eq!(judge("1.1.1.1", 443, true), None, "world reaches no pod");
        assert_eq!(judge("1.1.1.1", 5432, true), Some(true));
        assert_eq!(judge("1.1.1.1", 5432, false), None, "cluster is not world");
        assert_eq!(judge("10.1.1.1", 22, true), Some(true));
        assert_eq!(judge("10.1.1.1", 22, false), Some(true));
        let ten = t.lookup("10.1.1.1".parse().unwrap()).unwrap();
        assert_eq!(
            ten.allow,
            vec![PortProto::EVERY.into()],
            "both sides: unscoped"
        );
        assert_eq!(
            ten.judge(|p| p.covers(22, Proto::Tcp), || panic!("asked")),
            Some(true),
            "an unscoped entry never asks where the address is"
        );
        // world 80 + cluster 80 is 80 anywhere; world 443 inside an unscoped 0-1023 goes.
        let merged = compile_table(
            &[
                (
                    vec![scoped(Cidr::ALL4, Scope::Outside)],
                    vec![tcp(80), tcp(443)],
                ),
                (
                    vec![scoped(Cidr::ALL4, Scope::Inside)],
                    vec![tcp(80), tcp(5432)],
                ),
                (
                    vec![CidrBlock::new(Cidr::ALL4)],
                    vec![PortProto {
                        end_port: 1023,
                        ..tcp(0)
                    }],
                ),
            ],
            &[],
        );
        assert_eq!(
            merged[0].allow,
            vec![
                PortProto {
                    end_port: 1023,
                    ..tcp(0)
                }
                .into(),
                tcp(80).into(),
                L3Port {
                    scope: Scope::Inside,
                    ports: tcp(5432)
                },
            ]
        );
        assert_eq!(judge("10.9.1.1", 443, false), Some(false), "denied outside");
        assert_eq!(judge("10.9.1.1", 443, true), Some(true), "not inside");
        assert_eq!(judge("10.9.1.1", 80, false), Some(true));
    }
}
