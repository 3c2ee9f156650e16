//! The pinned maps' key and value types, mirrored from `ebpf/dnsfence.h` (`#[repr(C)]`, the
//! same field order, explicit zeroed padding). aya checks key and value sizes when a map is
//! opened; the tests below pin the sizes to the header's.
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use dnsfence_engine::allow::{AllowKey, PortSpec};
use dnsfence_policy::EndpointKey;

/// Version of the map layouts; pinned maps live under `<bpf-pin>/maps-v<ABI>/`.
pub const ABI: u32 = 3;
/// Port specs per endpoint in `df_endpoints` (`DF_MAX_SPECS`).
pub const MAX_SPECS: usize = 8;
/// The deepest cgroup level (below the hierarchy's root) the programs look an endpoint up at
/// (`DF_MAX_DEPTH`).
pub const MAX_DEPTH: usize = 16;
/// Port specs allowed, and denied, per L3 prefix entry (`DF_MAX_L3_SPECS`).
pub const MAX_L3_SPECS: usize = 8;
/// `DF_EP_ENFORCE`: the endpoint is selected by an egress policy (default deny).
pub const EP_ENFORCE: u32 = 1;
/// `DF_SCOPE_*`: which addresses of an L3 prefix a `df_cidr` spec applies to.
pub const SCOPE_ANY: u8 = 0;
/// `DF_SCOPE_OUTSIDE`: those outside the cluster (`world`, CIDR rules).
pub const SCOPE_OUTSIDE: u8 = 1;
/// `DF_SCOPE_INSIDE`: those inside it (`cluster`).
pub const SCOPE_INSIDE: u8 = 2;
/// `DF_CLUSTER_OUTSIDE`: a `df_cluster` value, the IPv4 shadow of an IPv6 prefix.
pub const CLUSTER_OUTSIDE: u8 = 0;
/// `DF_CLUSTER_INSIDE`: the prefix is inside the cluster.
pub const CLUSTER_INSIDE: u8 = 1;
/// `DF_CLUSTER_UNKNOWN`: the cluster's prefixes did not all fit; an address not found may be
/// inside (scoped allows do not apply, scoped denies do).
pub const CLUSTER_UNKNOWN: u8 = 2;

/// Slots of `df_reuse_socks` per (protocol, family) reuseport group (`DF_REUSE_GROUP_SLOTS`).
pub const REUSE_GROUP_SLOTS: u32 = 64;
/// Slots a process owns in each group (`DF_REUSE_OWNER_SLOTS`): the agent the first ones, the
/// standalone proxy the next.
pub const REUSE_OWNER_SLOTS: u32 = 32;
/// Groups: (TCP ? 2 : 0) + (IPv6 ? 1 : 0) (`DF_REUSE_GROUPS`).
pub const REUSE_GROUPS: u32 = 4;
/// `DF_REUSE_STALE_NS`: an owner silent for this long gets no new packets while the other
/// has active sockets (`df_reuse_alive`).
pub const REUSE_STALE_NS: u64 = 20_000_000;
/// `DF_REUSE_BALANCE`: spread over every active socket.
pub const REUSE_BALANCE: u32 = 0;
/// `DF_REUSE_PREFER_AGENT`: the agent's active sockets when it has any.
pub const REUSE_PREFER_AGENT: u32 = 1;

/// `struct df_reuse_owner`: `df_reuse_state[group * 2 + owner]`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReuseOwner {
    /// Bit i: the owner's slot i of the group takes new packets.
    pub active: u32,
    /// A token of the owning process (its pid mixed with random bits: a pid repeats across
    /// pid namespaces).
    pub pid: u32,
}

/// `struct df_reuse_conf`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReuseConf {
    /// `REUSE_BALANCE` or `REUSE_PREFER_AGENT`.
    pub mode: u32,
    /// Zero.
    pub pad: u32,
}

/// The names of the maps in the object.
pub mod names {
    /// `df_config`.
    pub const CONFIG: &str = "df_config";
    /// `df_endpoints`.
    pub const ENDPOINTS: &str = "df_endpoints";
    /// `df_allow`.
    pub const ALLOW: &str = "df_allow";
    /// `df_sock_dst` (read only: redirect state of sockets of programs before `df_sock_srv`).
    pub const SOCK_DST: &str = "df_sock_dst";
    /// `df_cidr`.
    pub const CIDR: &str = "df_cidr";
    /// `df_cluster`.
    pub const CLUSTER: &str = "df_cluster";
    /// `df_allow_names`.
    pub const ALLOW_NAMES: &str = "df_allow_names";
    /// `df_sock_srv` (socket-local storage: the server a redirected socket addressed).
    pub const SOCK_SRV: &str = "df_sock_srv";
    /// `df_origin`.
    pub const ORIGIN: &str = "df_origin";
    /// `df_stats`.
    pub const STATS: &str = "df_stats";
    /// `df_reuse_socks` (REUSEPORT_SOCKARRAY: the serving sockets of agent and proxy).
    pub const REUSE_SOCKS: &str = "df_reuse_socks";
    /// `df_reuse_state` (which of those take new packets).
    pub const REUSE_STATE: &str = "df_reuse_state";
    /// `df_reuse_conf` (the steering mode).
    pub const REUSE_CONF: &str = "df_reuse_conf";
    /// `df_reuse_alive` (owner -> its last heartbeat, CLOCK_BOOTTIME ns).
    pub const REUSE_ALIVE: &str = "df_reuse_alive";
    /// Every map.
    pub const ALL: [&str; 14] = [
        CONFIG,
        ENDPOINTS,
        ALLOW,
        ALLOW_NAMES,
        SOCK_DST,
        SOCK_SRV,
        ORIGIN,
        STATS,
        CIDR,
        CLUSTER,
        REUSE_SOCKS,
        REUSE_STATE,
        REUSE_CONF,
        REUSE_ALIVE,
    ];
}

/// `struct df_addr`: 16 bytes in network order, IPv4 as IPv4-mapped IPv6.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Addr(pub [u8; 16]);

impl Addr {
    /// The map form of an address.
    pub fn of(ip: IpAddr) -> Addr {
        Addr(match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        })
    }

    /// The address (IPv4-mapped as IPv4).
    pub fn ip(&self) -> IpAddr {
        let v6 = Ipv6Addr::from(self.0);
        v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
    }
}

/// `struct df_spec`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Spec {
    /// First port.
    pub lo: u16,
    /// Last port.
    pub hi: u16,
    /// `DF_PROTO_*` bits (the same as [`PortSpec`]'s).
    pub protos: u8,
    /// `SCOPE_*` in `df_cidr` values; zero elsewhere.
    pub scope: u8,
    /// Zero.
    pub pad: [u8; 2],
}

impl From<PortSpec> for Spec {
    fn from(p: PortSpec) -> Spec {
        Spec {
            lo: p.lo,
            hi: p.hi,
            protos: p.protos,
            scope: SCOPE_ANY,
            pad: [0; 2],
        }
    }
}

impl From<Spec> for PortSpec {
    fn from(s: Spec) -> PortSpec {
        PortSpec {
            lo: s.lo,
            hi: s.hi,
            protos: s.protos,
        }
    }
}

/// `struct df_config`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Config {
    /// The IPv4 proxy address (mapped), valid when `has4`.
    pub proxy4: Addr,
    /// The IPv6 proxy address, valid when `has6`.
    pub proxy6: Addr,
    /// The proxy port.
    pub port: u16,
    /// Whether `proxy4` is set.
    pub has4: u8,
    /// Whether `proxy6` is set.
    pub has6: u8,
    /// Zero.
    pub pad: u32,
}

/// `struct df_endpoint`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// The stable `EndpointKey`.
    pub key: u64,
    /// `DF_EP_*` bits.
    pub flags: u32,
    /// Specs in use.
    pub nspecs: u32,
    /// The port specs of the endpoint's toFQDNs rules.
    pub specs: [Spec; MAX_SPECS],
}

/// `struct df_allow_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct AllowMapKey {
    /// The `EndpointKey`.
    pub endpoint: u64,
    /// The address.
    pub addr: Addr,
    /// The port spec.
    pub spec: Spec,
}

impl From<&AllowKey> for AllowMapKey {
    fn from(k: &AllowKey) -> AllowMapKey {
        AllowMapKey {
            endpoint: k.endpoint.0,
            addr: Addr::of(k.ip),
            spec: k.ports.into(),
        }
    }
}

impl From<&AllowMapKey> for AllowKey {
    fn from(k: &AllowMapKey) -> AllowKey {
        AllowKey {
            endpoint: EndpointKey(k.endpoint),
            ip: k.addr.ip(),
            ports: k.spec.into(),
        }
    }
}

/// The data of a `struct df_cidr_key` (aya's `lpm_trie::Key` adds the `prefixlen`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct CidrData {
    /// The `EndpointKey`'s bytes in host order.
    pub endpoint: [u8; 8],
    /// The prefix's address.
    pub addr: Addr,
}

/// `struct df_cidr_val`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CidrValue {
    /// Allow specs in use.
    pub nallow: u8,
    /// Deny specs in use.
    pub ndeny: u8,
    /// Zero.
    pub pad: [u8; 6],
    /// Ports allowed.
    pub allow: [Spec; MAX_L3_SPECS],
    /// Ports denied.
    pub deny: [Spec; MAX_L3_SPECS],
}

/// `struct df_name`: a question name in wire form.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameValue {
    /// Bytes used.
    pub len: u8,
    /// The name.
    pub wire: [u8; 255],
}

impl NameValue {
    /// The value of a name (None if its wire form does not fit, which a valid name always does).
    pub fn of(wire: &[u8]) -> Option<NameValue> {
        let mut v = NameValue {
            len: u8::try_from(wire.len()).ok()?,
            wire: [0; 255],
        };
        v.wire.get_mut(..wire.len())?.copy_from_slice(wire);
        Some(v)
    }

    /// The wire bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.wire[..usize::from(self.len)]
    }
}

/// `struct df_dst`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dst {
    /// The server's address.
    pub addr: Addr,
    /// Its port.
    pub port: u16,
    /// Zero.
    pub pad: [u16; 3],
}

/// `struct df_origin_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct OriginKey {
    /// The client's address as the proxy sees it.
    pub addr: Addr,
    /// Its port.
    pub port: u16,
    /// `IPPROTO_UDP` or `IPPROTO_TCP`.
    pub proto: u8,
    /// Zero.
    pub pad: [u8; 5],
}

impl OriginKey {
    /// The key of a client address.
    pub fn of(client: SocketAddr, proto: u8) -> OriginKey {
        OriginKey {
            addr: Addr::of(client.ip()),
            port: client.port(),
            proto,
            pad: [0; 5],
        }
    }
}

/// `struct df_origin`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OriginValue {
    /// The `EndpointKey` (0: a process of no endpoint).
    pub endpoint: u64,
    /// The endpoint's cgroup id.
    pub cgroup: u64,
    /// The server the client addressed.
    pub server: Addr,
    /// Its port.
    pub server_port: u16,
    /// Zero.
    pub pad: [u16; 3],
}

/// `enum df_stat`: indices of `df_stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Stat {
    /// DNS sockets rewritten to the proxy.
    Redirected = 0,
    /// connect() refused.
    ConnectDenied,
    /// sendmsg() refused.
    SendmsgDenied,
    /// Packets dropped by the egress backstop.
    SkbDenied,
    /// Origin entries written.
    Origins,
    /// DNS refused: no proxy address for the family.
    NoProxy,
    /// Connections allowed by an allow entry.
    Allowed,
}

impl Stat {
    /// Every counter, in index order.
    pub const ALL: [Stat; 7] = [
        Stat::Redirected,
        Stat::ConnectDenied,
        Stat::SendmsgDenied,
        Stat::SkbDenied,
        Stat::Origins,
        Stat::NoProxy,
        Stat::Allowed,
    ];

    /// The counter's metric-friendly name.
    pub fn name(self) -> &'static str {
        match self {
            Stat::Redirected => "redirected",
            Stat::ConnectDenied => "connect_denied",
            Stat::SendmsgDenied => "sendmsg_denied",
            Stat::SkbDenied => "skb_denied",
            Stat::Origins => "origins",
            Stat::NoProxy => "no_proxy",
            Stat::Allowed => "allowed",
        }
    }
}

// SAFETY: each type is #[repr(C)], made of integers and byte arrays only, with every byte a
// field (padding is explicit): any bit pattern is valid and no byte is uninitialised.
unsafe impl aya::Pod for Addr {}
// SAFETY: as above.
unsafe impl aya::Pod for Spec {}
// SAFETY: as above.
unsafe impl aya::Pod for Config {}
// SAFETY: as above.
unsafe impl aya::Pod for Endpoint {}
// SAFETY: as above.
unsafe impl aya::Pod for AllowMapKey {}
// SAFETY: as above.
unsafe impl aya::Pod for Dst {}
// SAFETY: as above.
unsafe impl aya::Pod for CidrData {}
// SAFETY: as above.
unsafe impl aya::Pod for NameValue {}
// SAFETY: as above.
unsafe impl aya::Pod for CidrValue {}
// SAFETY: as above.
unsafe impl aya::Pod for OriginKey {}
// SAFETY: as above.
unsafe impl aya::Pod for OriginValue {}
// SAFETY: as above.
unsafe impl aya::Pod for ReuseOwner {}
// SAFETY: as above.
unsafe impl aya::Pod for ReuseConf {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{align_of, size_of};

    /// Sizes from `ebpf/dnsfence.h` (checked against the object's BTF by `btf_sizes_match`).
    #[test]
    fn sizes_match_the_header() {
        assert_eq!(size_of::<Addr>(), 16);
        assert_eq!(size_of::<Spec>(), 8);
        assert_eq!(size_of::<Config>(), 40);
        assert_eq!(size_of::<Endpoint>(), 16 + 8 * MAX_SPECS);
        assert_eq!(size_of::<AllowMapKey>(), 32);
        assert_eq!(size_of::<Dst>(), 24);
        assert_eq!(size_of::<OriginKey>(), 24);
        assert_eq!(size_of::<OriginValue>(), 40);
        assert_eq!(size_of::<NameValue>(), 256);
        // df_cidr_key is 4 + 24 (no padding: the data is bytes), df_cidr_val 8 + 2 * 8 * 8.
        assert_eq!(size_of::<aya::maps::lpm_trie::Key<CidrData>>(), 28);
        assert_eq!(size_of::<CidrValue>(), 8 + 2 * 8 * MAX_L3_SPECS);
        // df_cluster_key is 4 + 16.
        assert_eq!(size_of::<aya::maps::lpm_trie::Key<Addr>>(), 20);
        assert!(align_of::<AllowMapKey>() <= 8);
        assert_eq!(size_of::<ReuseOwner>(), 8);
        assert_eq!(size_of::<ReuseConf>(), 8);
    }

    /// The header's constants are the ones compiled into the object this crate embeds.
    #[test]
    fn header_constants_match() {
        let header = include_str!("../../ebpf/dnsfence.h");
        let define = |name: &str| -> u32 {
            let line = header
                .lines()
                .find(|l| l.starts_with(&format!("#define {name} ")))
                .unwrap_or_else(|| panic!("{name} not in dnsfence.h"));
            line.split_whitespace().nth(2).unwrap().parse().unwrap()
        };
        assert_eq!(define("DF_ABI"), ABI);
        assert_eq!(define("DF_MAX_SPECS") as usize, MAX_SPECS);
        assert_eq!(define("DF_MAX_DEPTH") as usize, MAX_DEPTH);
        assert_eq!(define("DF_MAX_L3_SPECS") as usize, MAX_L3_SPECS);
        assert_eq!(define("DF_EP_ENFORCE"), EP_ENFORCE);
        assert_eq!(define("DF_SCOPE_ANY") as u8, SCOPE_ANY);
        assert_eq!(define("DF_SCOPE_OUTSIDE") as u8, SCOPE_OUTSIDE);
        assert_eq!(define("DF_SCOPE_INSIDE") as u8, SCOPE_INSIDE);
        assert_eq!(define("DF_CLUSTER_OUTSIDE") as u8, CLUSTER_OUTSIDE);
        assert_eq!(define("DF_CLUSTER_INSIDE") as u8, CLUSTER_INSIDE);
        assert_eq!(define("DF_CLUSTER_UNKNOWN") as u8, CLUSTER_UNKNOWN);
        assert_eq!(define("DF_PROTO_TCP") as u8, PortSpec::TCP);
        assert_eq!(define("DF_PROTO_UDP") as u8, PortSpec::UDP);
        assert_eq!(define("DF_PROTO_SCTP") as u8, PortSpec::SCTP);
        assert_eq!(define("DF_PROTO_ICMP") as u8, PortSpec::ICMP);
        assert_eq!(define("DF_PROTO_ICMPV6") as u8, PortSpec::ICMPV6);
        assert_eq!(define("DF_REUSE_GROUP_SLOTS"), REUSE_GROUP_SLOTS);
        assert_eq!(define("DF_REUSE_OWNER_SLOTS"), REUSE_OWNER_SLOTS);
        assert_eq!(define("DF_REUSE_GROUPS"), REUSE_GROUPS);
        assert_eq!(define("DF_REUSE_BALANCE"), REUSE_BALANCE);
        assert_eq!(define("DF_REUSE_PREFER_AGENT"), REUSE_PREFER_AGENT);
        let stale = header
            .lines()
            .find_map(|l| l.strip_prefix("#define DF_REUSE_STALE_NS "))
            .expect("DF_REUSE_STALE_NS in dnsfence.h");
        assert_eq!(
            stale.trim().trim_end_matches("ULL").parse::<u64>(),
            Ok(REUSE_STALE_NS)
        );
    }

    #[test]
    fn addresses_round_trip_mapped() {
        for ip in ["127.0.0.1", "::1", "2001:db8::53", "192.0.2.53"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(Addr::of(ip).ip(), ip);
        }
        let v4: IpAddr = "192.0.2.53".parse().unwrap();
        assert_eq!(
            Addr::of(v4).0[10..],
            [0xff, 0xff, 192, 0, 2, 53],
            "IPv4 as ::ffff:a.b.c.d"
        );
    }
}
