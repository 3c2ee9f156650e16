/* SPDX-License-Identifier: Apache-2.0 */
/*
 * dnsfence datapath: the layouts of the pinned maps, shared by the BPF programs
 * (dnsfence.bpf.c) and the loader (datapath/src/maps.rs mirrors every struct with a
 * #[repr(C)] type and tests its size). Change a layout here, bump DF_ABI there and here.
 *
 * Conventions: every address is 16 bytes, IPv4 as IPv4-mapped IPv6 (::ffff:a.b.c.d), in
 * network byte order; ports are in host byte order; all padding is explicit and zero.
 */
#ifndef DNSFENCE_H
#define DNSFENCE_H

#include <linux/types.h>

/* Version of the map layouts: pinned maps live under <bpf-pin>/maps-v<DF_ABI>/. */
#define DF_ABI 3

/* Port specs (toPorts entries of toFQDNs rules) an endpoint may have; more fail closed. */
#define DF_MAX_SPECS 8
/* Port specs allowed, and denied, per L3 prefix entry (more: allow fails closed, deny
 * becomes everything). */
#define DF_MAX_L3_SPECS 8
/* Cgroup levels below the hierarchy's root searched for an endpoint's cgroup (the ancestor
 * helpers count from the root, not from the attach point). */
#define DF_MAX_DEPTH 16

/* Protocol bits of a port spec. For the ICMP bits the spec's range is of ICMP types. */
#define DF_PROTO_TCP 1
#define DF_PROTO_UDP 2
#define DF_PROTO_SCTP 4
#define DF_PROTO_ICMP 8
#define DF_PROTO_ICMPV6 16

/* df_endpoint.flags */
#define DF_EP_ENFORCE 1 /* selected by an egress policy: default deny */

struct df_addr {
	__u32 w[4]; /* network order; IPv4 in w[3] with w[2] = htonl(0xffff) */
};

/* A port range and the protocols it applies to; in df_cidr values, also which addresses of
 * the prefix (DF_SCOPE_*; zero elsewhere). */
struct df_spec {
	__u16 lo;
	__u16 hi;
	__u8 protos;
	__u8 scope;
	__u8 pad[2];
};

/* df_spec.scope: Cilium's `world` and CIDR rules take only destinations outside the cluster,
 * `cluster` only those inside it; df_cluster says which side an address is on. */
#define DF_SCOPE_ANY 0
#define DF_SCOPE_OUTSIDE 1
#define DF_SCOPE_INSIDE 2

/* config[0]: where redirected DNS goes (the proxies' shared listen address). */
struct df_config {
	struct df_addr proxy4; /* valid when has4 */
	struct df_addr proxy6; /* valid when has6 */
	__u16 port;
	__u8 has4;
	__u8 has6;
	__u32 pad;
};

/* endpoints: cgroup id (inode of the cgroup v2 directory) -> endpoint. */
struct df_endpoint {
	__u64 key; /* EndpointKey: stable across reloads and processes */
	__u32 flags;
	__u32 nspecs;
	struct df_spec specs[DF_MAX_SPECS];
};

/* allow: (endpoint, address, spec) -> expiry (CLOCK_BOOTTIME ns). */
struct df_allow_key {
	__u64 endpoint;
	struct df_addr addr;
	struct df_spec spec;
};

/* cidr (LPM trie): (endpoint, address prefix) -> the ports the endpoint's L3 rules allow and
 * deny there. prefixlen counts the 64 endpoint bits plus the address prefix (IPv4 prefixes
 * are mapped: 64 + 96 + len). The longest match is the verdict; deny wins over allow and
 * over allow entries. */
struct df_cidr_key {
	__u32 prefixlen;
	__u8 endpoint[8]; /* the EndpointKey's bytes in host order */
	__u8 addr[16];
};

struct df_cidr_val {
	__u8 nallow;
	__u8 ndeny;
	__u8 pad[6];
	struct df_spec allow[DF_MAX_L3_SPECS];
	struct df_spec deny[DF_MAX_L3_SPECS];
};

/* cluster (LPM trie): address prefix -> DF_CLUSTER_*: the cluster's addresses (registered
 * endpoints and services, the nodes, the cluster ranges; what `world` leaves out), one map
 * for every endpoint. The longest match decides; no match is outside. IPv4 prefixes are
 * mapped (96 + len). */
struct df_cluster_key {
	__u32 prefixlen;
	__u8 addr[16];
};

#define DF_CLUSTER_OUTSIDE 0 /* an IPv4 shadow of IPv6 prefixes that contain ::ffff:0:0/96 */
#define DF_CLUSTER_INSIDE 1
/* The cluster's addresses did not all fit: an address not found may be inside. At ::/0
 * (and the IPv4 shadow): scoped allows do not apply there, scoped denies do. */
#define DF_CLUSTER_UNKNOWN 2

/* allow_names (userspace only): an allow entry -> the question name that justified it (wire
 * form), so a restarted agent can judge restored entries by name against a changed policy. */
struct df_name {
	__u8 len;
	__u8 wire[255];
};

/* sock_srv (socket-local storage) and, read only for sockets of earlier programs, sock_dst
 * (socket cookie ->): the DNS server a redirected socket addressed. */
struct df_dst {
	struct df_addr addr;
	__u16 port;
	__u16 pad[3];
};

/* origin: a redirected client as the proxy sees it -> who it is and whom it asked. */
struct df_origin_key {
	struct df_addr addr;
	__u16 port;
	__u8 proto; /* IPPROTO_UDP or IPPROTO_TCP */
	__u8 pad[5];
};

struct df_origin {
	__u64 endpoint; /* EndpointKey */
	__u64 cgroup;   /* the endpoint's cgroup id */
	struct df_addr server;
	__u16 server_port; /* 0: sent to the proxy itself, not redirected */
	__u16 pad[3];
};

/* SO_REUSEPORT steering (df_reuseport): every serving socket of the agent and of the
 * standalone proxy sits in df_reuse_socks (REUSEPORT_SOCKARRAY, value: the socket's fd when
 * written, __u32) at a slot its process owns; df_reuse_state says which of them take new
 * packets. Slots come in groups, one per (protocol, family) reuseport group: group
 * (TCP ? 2 : 0) + (IPv6 ? 1 : 0), DF_REUSE_GROUP_SLOTS slots each; in a group the agent owns
 * the first DF_REUSE_OWNER_SLOTS slots, the proxy the next ones (slot = group base + owner
 * base + the shard's index among its process's shards on that listen address). */
#define DF_REUSE_GROUP_SLOTS 64
#define DF_REUSE_OWNER_SLOTS 32
#define DF_REUSE_GROUPS 4
#define DF_REUSE_SLOTS (DF_REUSE_GROUPS * DF_REUSE_GROUP_SLOTS)

/* df_reuse_state: (group * 2 + owner (0: agent, 1: proxy)) -> the owner's active slots of
 * the group, bit i for its slot i. One writer per entry (its owner), whole values. */
struct df_reuse_owner {
	__u32 active; /* bit i: slot i takes new packets (a polling, not stopping, shard) */
	__u32 pid;    /* a token of the owning process (its pid mixed with random bits: a pid
		       * repeats across pid namespaces) */
};

/* df_reuse_alive: owner (0: agent, 1: proxy) -> when it last said it lives
 * (CLOCK_BOOTTIME ns; 0: never, taken as alive). A process beats every few ms; one silent
 * for DF_REUSE_STALE_NS (SIGKILLed, its sockets not yet closed while the kernel tears it
 * down) gets no new packets while the other one has active sockets. */
#define DF_REUSE_STALE_NS 20000000ULL

/* df_reuse_conf.mode (one entry) */
#define DF_REUSE_BALANCE 0      /* spread over every active socket */
#define DF_REUSE_PREFER_AGENT 1 /* the agent's active sockets when it has any */

struct df_reuse_conf {
	__u32 mode;
	__u32 pad;
};

/* stats: per-CPU counters, by index. */
enum df_stat {
	DF_STAT_REDIRECTED = 0,    /* DNS sockets rewritten to the proxy */
	DF_STAT_CONNECT_DENIED,    /* connect() refused (EPERM) */
	DF_STAT_SENDMSG_DENIED,    /* sendmsg() refused (EPERM) */
	DF_STAT_SKB_DENIED,        /* packets dropped by the egress backstop */
	DF_STAT_ORIGINS,           /* origin entries written */
	DF_STAT_NO_PROXY,          /* DNS refused: no proxy address for the family (or no
	                            * memory for the socket's redirect state) */
	DF_STAT_ALLOWED,           /* connections allowed by an allow entry */
	DF_STAT_MAX,
};

#endif
