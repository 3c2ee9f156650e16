// SPDX-License-Identifier: GPL-2.0
/*
 * dnsfence datapath, attached at the cgroup v2 root (--cgroup-root). One program per hook:
 *
 *  connect4/6, sendmsg4/6   DNS (port 53, UDP or TCP) of an endpoint goes to the proxy; the
 *                           server it addressed is remembered per socket (sock_dst). Any other
 *                           destination of an enforced endpoint needs an unexpired allow entry
 *                           covering (address, protocol, port), else EPERM.
 *  recvmsg4/6, getpeername4/6
 *                           answers from the proxy appear to come from the server the socket
 *                           addressed.
 *  cgroup_skb/egress        records who sent each packet that reaches the proxy (origin: the
 *                           proxy's view of the client -> endpoint and server asked), and is
 *                           the backstop for what bypasses the socket hooks: new TCP
 *                           connections (SYN), raw sockets, other protocols; and judges ICMP
 *                           and ICMPv6 by type (icmps rules, L3 rules without ports).
 *  sk_reuseport/migrate     (attached to the proxies' listen sockets, not to the cgroup) picks
 *                           the socket of a new datagram or connection among the active
 *                           ones of the agent and the standalone proxy, so that a stopping
 *                           process gets no new packets while it drains; also picks where
 *                           the accept queue of a closing TCP listener goes.
 *
 * A process belongs to the endpoint whose cgroup is its nearest ancestor (or own) cgroup in
 * the endpoints map. Processes of no endpoint are not touched. Built with Debian clang from
 * UAPI headers only (ebpf/build.sh); the stripped object is committed beside this file.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/socket.h>
#include <linux/tcp.h>
#include <linux/udp.h>

#include "dnsfence.h"

#define SEC(name) __attribute__((section(name), used))
#undef __always_inline
#define __always_inline inline __attribute__((always_inline))
#define __uint(name, val) int(*name)[val]
#define __type(name, val) typeof(val) *name

#define LIBBPF_PIN_BY_NAME 1
#define AF_INET 2
#define AF_INET6 10

/* Helpers, by number (no libbpf headers needed). */
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)BPF_FUNC_map_lookup_elem;
static long (*bpf_map_update_elem)(void *map, const void *key, const void *value,
				   __u64 flags) = (void *)BPF_FUNC_map_update_elem;
static __u64 (*bpf_get_socket_cookie)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;
static __u64 (*bpf_get_current_ancestor_cgroup_id)(int level) =
	(void *)BPF_FUNC_get_current_ancestor_cgroup_id;
static __u64 (*bpf_skb_ancestor_cgroup_id)(struct __sk_buff *skb, int level) =
	(void *)BPF_FUNC_skb_ancestor_cgroup_id;
static long (*bpf_sk_select_reuseport)(struct sk_reuseport_md *reuse, void *map, void *key,
				       __u64 flags) = (void *)BPF_FUNC_sk_select_reuseport;
static __u64 (*bpf_ktime_get_boot_ns)(void) = (void *)BPF_FUNC_ktime_get_boot_ns;
static long (*bpf_skb_load_bytes)(const void *skb, __u32 offset, void *to,
				  __u32 len) = (void *)BPF_FUNC_skb_load_bytes;
static struct bpf_sock *(*bpf_sk_fullsock)(struct bpf_sock *sk) = (void *)BPF_FUNC_sk_fullsock;
static long (*bpf_loop)(__u32 nr_loops, void *callback_fn, void *callback_ctx, __u64 flags) =
	(void *)BPF_FUNC_loop;
static void *(*bpf_sk_storage_get)(void *map, void *sk, void *value,
				   __u64 flags) = (void *)BPF_FUNC_sk_storage_get;

#define bpf_htons(x) __builtin_bswap16(x)
#define bpf_ntohs(x) __builtin_bswap16(x)
#define bpf_htonl(x) __builtin_bswap32(x)

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct df_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} df_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct df_endpoint);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} df_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1048576);
	__type(key, struct df_allow_key);
	__type(value, __u64);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} df_allow SEC(".maps");

/* Written and read by userspace only (the loader sizes it like df_allow). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1048576);
	__type(key, struct df_allow_key);
	__type(value, struct df_name);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} df_allow_names SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__type(key, struct df_cidr_key);
	__type(value, struct df_cidr_val);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} df_cidr SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__type(key, struct df_cluster_key);
	__type(value, __u8);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} df_cluster SEC(".maps");

/* Read only, for sockets redirected by programs of before df_sock_srv (an upgrade in place
 * keeps their answers restored); nothing writes it any more. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct df_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} df_sock_dst SEC(".maps");

/* The server a redirected socket addressed, stored in the socket itself: it lives and dies
 * with the socket, and no other socket's churn can evict it (a node-wide LRU keyed by
 * cookie could be flushed by any workload creating sockets). */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct df_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} df_sock_srv SEC(".maps");

/* The server sk addressed, if it was redirected. */
static __always_inline struct df_dst *sock_server(void *ctx, struct bpf_sock *sk)
{
	struct df_dst *d = bpf_sk_storage_get(&df_sock_srv, sk, 0, 0);
	if (d)
		return d;
	__u64 cookie = bpf_get_socket_cookie(ctx);
	return bpf_map_lookup_elem(&df_sock_dst, &cookie);
}

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct df_origin_key);
	__type(value, struct df_origin);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} df_origin SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DF_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} df_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
	__uint(max_entries, DF_REUSE_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} df_reuse_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, DF_REUSE_GROUPS * 2);
	__type(key, __u32);
	__type(value, struct df_reuse_owner);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} df_reuse_state SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct df_reuse_conf);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} df_reuse_conf SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} df_reuse_alive SEC(".maps");

static __always_inline void count(__u32 stat)
{
	__u64 *v = bpf_map_lookup_elem(&df_stats, &stat);
	if (v)
		*v += 1;
}

static __always_inline void addr_from4(struct df_addr *a, __u32 ip4)
{
	a->w[0] = 0;
	a->w[1] = 0;
	a->w[2] = bpf_htonl(0xffff);
	a->w[3] = ip4;
}

static __always_inline int addr_is_mapped4(const struct df_addr *a)
{
	return a->w[0] == 0 && a->w[1] == 0 && a->w[2] == bpf_htonl(0xffff);
}

static __always_inline int addr_eq(const struct df_addr *a, const struct df_addr *b)
{
	return a->w[0] == b->w[0] && a->w[1] == b->w[1] && a->w[2] == b->w[2] && a->w[3] == b->w[3];
}

static __always_inline struct df_config *config(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&df_config, &zero);
}

/* The endpoint of the calling task: its deepest ancestor cgroup in the endpoints map. */
static __always_inline struct df_endpoint *current_endpoint(__u64 *cgroup)
{
	struct df_endpoint *found = 0;
#pragma unroll
	for (int level = 1; level <= DF_MAX_DEPTH; level++) {
		__u64 id = bpf_get_current_ancestor_cgroup_id(level);
		if (!id)
			break;
		struct df_endpoint *ep = bpf_map_lookup_elem(&df_endpoints, &id);
		if (ep) {
			found = ep;
			*cgroup = id;
		}
	}
	return found;
}

/* The endpoint of the socket that sent skb. */
static __always_inline struct df_endpoint *skb_endpoint(struct __sk_buff *skb, __u64 *cgroup)
{
	struct df_endpoint *found = 0;
#pragma unroll
	for (int level = 1; level <= DF_MAX_DEPTH; level++) {
		__u64 id = bpf_skb_ancestor_cgroup_id(skb, level);
		if (!id)
			break;
		struct df_endpoint *ep = bpf_map_lookup_elem(&df_endpoints, &id);
		if (ep) {
			found = ep;
			*cgroup = id;
		}
	}
	return found;
}

static __always_inline __u8 proto_bit(__u32 protocol)
{
	if (protocol == IPPROTO_TCP)
		return DF_PROTO_TCP;
	if (protocol == IPPROTO_UDP)
		return DF_PROTO_UDP;
	if (protocol == IPPROTO_SCTP)
		return DF_PROTO_SCTP;
	return 0;
}

/* Whether ep may reach (addr, port) over proto now: some spec of ep covering the port and
 * protocol has an unexpired allow entry for addr. */
static __always_inline int allowed(const struct df_endpoint *ep, const struct df_addr *addr,
				   __u16 port, __u8 proto)
{
	struct df_allow_key k = {};
	__u64 now = bpf_ktime_get_boot_ns();

	k.endpoint = ep->key;
	k.addr = *addr;
#pragma unroll
	for (int i = 0; i < DF_MAX_SPECS; i++) {
		if (i >= ep->nspecs)
			break;
		struct df_spec spec = ep->specs[i];
		if (!(spec.protos & proto) || port < spec.lo || port > spec.hi)
			continue;
		k.spec = spec;
		__u64 *expires = bpf_map_lookup_elem(&df_allow, &k);
		if (expires && *expires > now) {
			count(DF_STAT_ALLOWED);
			return 1;
		}
	}
	return 0;
}

static __always_inline int spec_covers(const struct df_spec *spec, __u16 port, __u8 proto)
{
	return (spec->protos & proto) && port >= spec->lo && port <= spec->hi;
}

/* Which side of the cluster's boundary addr is on: DF_CLUSTER_*. A subprogram, not inlined:
 * l3_verdict calls it from every spec it checks. */
static __attribute__((noinline)) int cluster_side(const struct df_addr *addr)
{
	struct df_cluster_key k = {};
	k.prefixlen = 128;
	__builtin_memcpy(k.addr, addr, 16);
	__u8 *v = bpf_map_lookup_elem(&df_cluster, &k);
	return v ? *v : DF_CLUSTER_OUTSIDE;
}

/* Whether a covering spec applies on addr's side of the cluster's boundary: an unscoped one
 * always; a scoped one where the side is its own, the side looked up once (*side < 0: not
 * yet); where the side is unknown, or a value is of no known kind, a deny applies and an
 * allow does not (fail closed). */
static __always_inline int scope_holds(const struct df_spec *spec, const struct df_addr *addr,
				       int *side, int deny)
{
	if (spec->scope == DF_SCOPE_ANY)
		return 1;
	if (*side < 0)
		*side = cluster_side(addr);
	/* Unknown (or any value but the two known sides), or a scope of no known kind. */
	if (*side != DF_CLUSTER_OUTSIDE && *side != DF_CLUSTER_INSIDE)
		return deny;
	if (spec->scope == DF_SCOPE_OUTSIDE)
		return *side == DF_CLUSTER_OUTSIDE;
	if (spec->scope == DF_SCOPE_INSIDE)
		return *side == DF_CLUSTER_INSIDE;
	return deny;
}

/* The endpoint's L3/L4 rules for (addr, port, proto): -1 denied (egressDeny), 1 allowed,
 * 0 no rule decides. Early returns, one lazily known side: the verifier's states stay few
 * (a version accumulating the covering specs' scopes as bit sets took 12x longer to verify,
 * and 40x without CAP_PERFMON). */
static __always_inline int l3_verdict(const struct df_endpoint *ep, const struct df_addr *addr,
				      __u16 port, __u8 proto)
{
	struct df_cidr_key k = {};
	k.prefixlen = 64 + 128;
	__builtin_memcpy(k.endpoint, &ep->key, 8);
	__builtin_memcpy(k.addr, addr, 16);
	struct df_cidr_val *v = bpf_map_lookup_elem(&df_cidr, &k);
	if (!v)
		return 0;
	int side = -1;
#pragma unroll
	for (int i = 0; i < DF_MAX_L3_SPECS; i++) {
		if (i < v->ndeny && spec_covers(&v->deny[i], port, proto) &&
		    scope_holds(&v->deny[i], addr, &side, 1))
			return -1;
	}
#pragma unroll
	for (int i = 0; i < DF_MAX_L3_SPECS; i++) {
		if (i < v->nallow && spec_covers(&v->allow[i], port, proto) &&
		    scope_holds(&v->allow[i], addr, &side, 0))
			return 1;
	}
	return 0;
}

/* Whether an enforced endpoint may reach (addr, port, proto): not denied by an egressDeny,
 * and allowed by an L3 rule or an unexpired toFQDNs allow entry. */
static __always_inline int permitted(const struct df_endpoint *ep, const struct df_addr *addr,
				     __u16 port, __u8 proto)
{
	int l3 = l3_verdict(ep, addr, port, proto);
	if (l3 < 0)
		return 0;
	if (l3 > 0) {
		count(DF_STAT_ALLOWED);
		return 1;
	}
	return allowed(ep, addr, port, proto);
}

/* The proxy address for a destination of this family (IPv4-mapped destinations of an IPv6
 * socket go to the IPv4 proxy in mapped form). */
static __always_inline const struct df_addr *proxy_for(const struct df_config *cfg,
							const struct df_addr *dst)
{
	if (addr_is_mapped4(dst))
		return cfg->has4 ? &cfg->proxy4 : 0;
	return cfg->has6 ? &cfg->proxy6 : 0;
}

enum verdict { PASS, REDIRECT, DENY };

/* The decision of connect/sendmsg for a destination. On REDIRECT *to is the proxy. */
static __always_inline enum verdict decide(struct bpf_sock *sk, const struct df_endpoint *ep,
					   const struct df_addr *dst, __u16 port, __u32 protocol,
					   const struct df_addr **to, __u16 *to_port)
{
	struct df_config *cfg = config();
	__u8 proto = proto_bit(protocol);

	if (cfg) {
		const struct df_addr *proxy = proxy_for(cfg, dst);
		if (proxy && addr_eq(dst, proxy) && port == cfg->port)
			return PASS; /* DNS sent to the proxy itself is always allowed */
		if (port == 53 && (proto == DF_PROTO_UDP || proto == DF_PROTO_TCP)) {
			if (!proxy) {
				count(DF_STAT_NO_PROXY);
				return (ep->flags & DF_EP_ENFORCE) ? DENY : PASS;
			}
			struct df_dst *orig = bpf_sk_storage_get(&df_sock_srv, sk, 0,
								 BPF_SK_STORAGE_GET_F_CREATE);
			if (!orig) {
				/* Nowhere to say whom it asked: refuse rather than misjudge. */
				count(DF_STAT_NO_PROXY);
				return DENY;
			}
			orig->addr = *dst;
			orig->port = port;
			*to = proxy;
			*to_port = cfg->port;
			count(DF_STAT_REDIRECTED);
			return REDIRECT;
		}
	} else if (port == 53 && (ep->flags & DF_EP_ENFORCE)) {
		return DENY; /* no proxy configured: DNS of an enforced endpoint fails closed */
	}
	if (!(ep->flags & DF_EP_ENFORCE))
		return PASS;
	/* A ping socket's connect has no ICMP type to judge: its packets are judged one by one,
	 * by type, in the egress program. */
	if (protocol == IPPROTO_ICMP || protocol == IPPROTO_ICMPV6)
		return PASS;
	return permitted(ep, dst, port, proto) ? PASS : DENY;
}

/* A sendmsg hook given port 0: the kernel refuses port 0 in a msg_name before the hook, so
 * this is a connected socket's send that carried control messages (IP_TOS, ECN, PKTINFO:
 * the kernel then runs the hook with a zeroed address). Its destination was judged, and
 * redirected, at connect, as for its sends without control messages, which run no hook. */
static __always_inline int connected_send(struct bpf_sock_addr *ctx, __u32 denied_stat)
{
	return denied_stat == DF_STAT_SENDMSG_DENIED && ctx->user_port == 0;
}

static __always_inline int sock_addr4(struct bpf_sock_addr *ctx, __u32 denied_stat)
{
	__u64 cgroup = 0;
	struct df_endpoint *ep = current_endpoint(&cgroup);
	if (!ep || connected_send(ctx, denied_stat))
		return 1;
	struct df_addr dst;
	const struct df_addr *to = 0;
	__u16 to_port = 0;
	addr_from4(&dst, ctx->user_ip4);
	__u16 port = bpf_ntohs((__u16)ctx->user_port);
	switch (decide(ctx->sk, ep, &dst, port, ctx->protocol, &to, &to_port)) {
	case PASS:
		return 1;
	case REDIRECT:
		if (to) {
			ctx->user_ip4 = to->w[3];
			ctx->user_port = bpf_htons(to_port);
		}
		return 1;
	default:
		count(denied_stat);
		return 0;
	}
}

static __always_inline int sock_addr6(struct bpf_sock_addr *ctx, __u32 denied_stat)
{
	__u64 cgroup = 0;
	struct df_endpoint *ep = current_endpoint(&cgroup);
	if (!ep || connected_send(ctx, denied_stat))
		return 1;
	struct df_addr dst;
	const struct df_addr *to = 0;
	__u16 to_port = 0;
	dst.w[0] = ctx->user_ip6[0];
	dst.w[1] = ctx->user_ip6[1];
	dst.w[2] = ctx->user_ip6[2];
	dst.w[3] = ctx->user_ip6[3];
	__u16 port = bpf_ntohs((__u16)ctx->user_port);
	switch (decide(ctx->sk, ep, &dst, port, ctx->protocol, &to, &to_port)) {
	case PASS:
		return 1;
	case REDIRECT:
		if (to) {
			ctx->user_ip6[0] = to->w[0];
			ctx->user_ip6[1] = to->w[1];
			ctx->user_ip6[2] = to->w[2];
			ctx->user_ip6[3] = to->w[3];
			ctx->user_port = bpf_htons(to_port);
		}
		return 1;
	default:
		count(denied_stat);
		return 0;
	}
}

SEC("cgroup/connect4")
int df_connect4(struct bpf_sock_addr *ctx)
{
	return sock_addr4(ctx, DF_STAT_CONNECT_DENIED);
}

SEC("cgroup/connect6")
int df_connect6(struct bpf_sock_addr *ctx)
{
	return sock_addr6(ctx, DF_STAT_CONNECT_DENIED);
}

SEC("cgroup/sendmsg4")
int df_sendmsg4(struct bpf_sock_addr *ctx)
{
	return sock_addr4(ctx, DF_STAT_SENDMSG_DENIED);
}

SEC("cgroup/sendmsg6")
int df_sendmsg6(struct bpf_sock_addr *ctx)
{
	return sock_addr6(ctx, DF_STAT_SENDMSG_DENIED);
}

/* Answers from the proxy to a redirected socket: show the server the socket addressed. */
static __always_inline const struct df_dst *restore_lookup(struct bpf_sock_addr *ctx,
							   const struct df_addr *src, __u16 port)
{
	struct df_config *cfg = config();
	if (!cfg || port != cfg->port)
		return 0;
	const struct df_addr *proxy = proxy_for(cfg, src);
	if (!proxy || !addr_eq(src, proxy))
		return 0;
	return sock_server(ctx, ctx->sk);
}

static __always_inline int restore4(struct bpf_sock_addr *ctx)
{
	struct df_addr src;
	addr_from4(&src, ctx->user_ip4);
	const struct df_dst *orig = restore_lookup(ctx, &src, bpf_ntohs((__u16)ctx->user_port));
	if (orig && addr_is_mapped4(&orig->addr)) {
		ctx->user_ip4 = orig->addr.w[3];
		ctx->user_port = bpf_htons(orig->port);
	}
	return 1;
}

static __always_inline int restore6(struct bpf_sock_addr *ctx)
{
	struct df_addr src;
	src.w[0] = ctx->user_ip6[0];
	src.w[1] = ctx->user_ip6[1];
	src.w[2] = ctx->user_ip6[2];
	src.w[3] = ctx->user_ip6[3];
	const struct df_dst *orig = restore_lookup(ctx, &src, bpf_ntohs((__u16)ctx->user_port));
	if (orig) {
		ctx->user_ip6[0] = orig->addr.w[0];
		ctx->user_ip6[1] = orig->addr.w[1];
		ctx->user_ip6[2] = orig->addr.w[2];
		ctx->user_ip6[3] = orig->addr.w[3];
		ctx->user_port = bpf_htons(orig->port);
	}
	return 1;
}

SEC("cgroup/recvmsg4")
int df_recvmsg4(struct bpf_sock_addr *ctx)
{
	return restore4(ctx);
}

SEC("cgroup/recvmsg6")
int df_recvmsg6(struct bpf_sock_addr *ctx)
{
	return restore6(ctx);
}

SEC("cgroup/getpeername4")
int df_getpeername4(struct bpf_sock_addr *ctx)
{
	return restore4(ctx);
}

SEC("cgroup/getpeername6")
int df_getpeername6(struct bpf_sock_addr *ctx)
{
	return restore6(ctx);
}

/* The walk over IPv4 options (see ipv4_source_routed). */
struct opt_walk {
	struct __sk_buff *skb;
	__u32 len;
	__u32 at;
	__u32 routed;
};

static long opt_step(__u32 index, void *data)
{
	struct opt_walk *w = data;
	__u8 type, olen;
	if (w->at >= w->len)
		return 1;
	if (bpf_skb_load_bytes(w->skb, sizeof(struct iphdr) + (w->at & 63), &type, 1))
		goto bad;
	if (type == 0) /* end of options */
		return 1;
	if (type == 1) { /* no-op */
		w->at++;
		return 0;
	}
	if (type == 0x83 || type == 0x89) /* LSRR, SSRR */
		goto bad;
	if (w->at + 1 >= w->len ||
	    bpf_skb_load_bytes(w->skb, sizeof(struct iphdr) + ((w->at + 1) & 63), &olen, 1) ||
	    olen < 2 || w->at + olen > w->len)
		goto bad;
	w->at += olen;
	return 0;
bad:
	w->routed = 1;
	return 1;
}

/* Whether IPv4 options (`len` bytes after the fixed header, at most 40) hold a loose or
 * strict source route; unreadable or malformed options count as one (refused). One callback
 * per option through bpf_loop: an unrolled walk of 40 bytes cost the verifier seconds. */
static __always_inline __u32 ipv4_source_routed(struct __sk_buff *skb, __u32 len)
{
	if (len > 40)
		return 1;
	struct opt_walk w = {.skb = skb, .len = len};
	if (bpf_loop(40, opt_step, &w, 0) < 0)
		return 1;
	return w.routed;
}

/* The egress backstop and the origin recorder. */
SEC("cgroup_skb/egress")
int df_egress(struct __sk_buff *skb)
{
	__u64 cgroup = 0;
	struct df_endpoint *ep = skb_endpoint(skb, &cgroup);
	__u32 enforce = ep && (ep->flags & DF_EP_ENFORCE);

	struct df_addr src = {}, dst = {};
	__u32 protocol;
	__u32 l4;
	__u16 frag = 0;
	/* A source route (IPv4 LSRR/SSRR, any IPv6 routing header): the packet
	 * is routed to an address other than the one connect/sendmsg judged (its first hop is
	 * the header's destination, reached by UDP and by established TCP, which pass here
	 * unjudged). Other options (timestamps, record route, CIPSO labels, which a server
	 * echoes to clients that sent them) are not routing. */
	__u32 routed = 0;
	/* Raw sockets (SOCK_RAW) pass no connect/sendmsg hook: every packet of theirs is judged
	 * here, whatever its TCP flags or fragment offset. */
	struct bpf_sock *sk = skb->sk;
	if (sk)
		sk = bpf_sk_fullsock(sk);
	__u32 raw = sk && sk->type == 3 /* SOCK_RAW */;
	/* A raw socket made before its process joined an enforced endpoint's cgroup is still
	 * the sender's: raw packets leave in the sender's context, so judge them by the
	 * sending task's endpoint when the socket's cgroup has none. */
	if (raw && !enforce) {
		__u64 task_cgroup = 0;
		struct df_endpoint *task_ep = current_endpoint(&task_cgroup);
		if (task_ep && (task_ep->flags & DF_EP_ENFORCE)) {
			ep = task_ep;
			cgroup = task_cgroup;
			enforce = 1;
		}
	}
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)))
			return enforce ? 0 : 1;
		addr_from4(&src, ip.saddr);
		addr_from4(&dst, ip.daddr);
		protocol = ip.protocol;
		l4 = (__u32)ip.ihl * 4;
		if (ip.ihl > 5)
			routed = ipv4_source_routed(skb, l4 - sizeof(ip));
		frag = ip.frag_off & bpf_htons(0x1fff);
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes(skb, 0, &ip6, sizeof(ip6)))
			return enforce ? 0 : 1;
		__builtin_memcpy(&src, &ip6.saddr, 16);
		__builtin_memcpy(&dst, &ip6.daddr, 16);
		protocol = ip6.nexthdr;
		l4 = sizeof(ip6);
		/* Walk a few extension headers (hop-by-hop, routing, destination options, AH,
		 * fragment) to the transport header; a chain longer than that is judged as the
		 * extension header it stops at (refused for an enforced endpoint). */
#pragma unroll
		for (int i = 0; i < 4; i++) {
			__u8 ext[4];
			if (protocol != IPPROTO_HOPOPTS && protocol != IPPROTO_ROUTING &&
			    protocol != IPPROTO_DSTOPTS && protocol != IPPROTO_AH &&
			    protocol != IPPROTO_FRAGMENT)
				break;
			if (bpf_skb_load_bytes(skb, l4, ext, sizeof(ext)))
				return enforce ? 0 : 1;
			/* Any routing header: with segments left 0 a type-4 header still puts its
			 * segment, not the judged address, in the destination (review finding). */
			if (protocol == IPPROTO_ROUTING)
				routed = 1;
			__u32 next = ext[0];
			if (protocol == IPPROTO_FRAGMENT) {
				/* Offset (13 bits) in bytes 2-3: a later fragment has no ports. */
				frag = (((__u16)ext[2] << 8) | ext[3]) & 0xfff8;
				l4 += 8;
			} else if (protocol == IPPROTO_AH) {
				l4 += ((__u32)ext[1] + 2) * 4;
			} else {
				l4 += ((__u32)ext[1] + 1) * 8;
			}
			protocol = next;
		}
	} else {
		return 1;
	}

	/* An enforced endpoint's source-routed packets are refused, to the proxy included: no
	 * workload needs a source route, and the hooks judged another address. */
	if (enforce && routed) {
		count(DF_STAT_SKB_DENIED);
		return 0;
	}

	/* Later fragments carry no ports; the first one was judged (a raw socket's are not:
	 * it can write any offset, so an enforced endpoint's raw fragments are refused). */
	if (frag) {
		if (enforce && raw) {
			count(DF_STAT_SKB_DENIED);
			return 0;
		}
		return 1;
	}

	__u16 ports[2] = {0, 0};
	__u8 tcp_flags = 0;
	if (protocol == IPPROTO_TCP || protocol == IPPROTO_UDP) {
		if (bpf_skb_load_bytes(skb, l4, ports, sizeof(ports)))
			return enforce ? 0 : 1;
		if (protocol == IPPROTO_TCP && bpf_skb_load_bytes(skb, l4 + 13, &tcp_flags, 1))
			return enforce ? 0 : 1;
	}
	__u16 sport = bpf_ntohs(ports[0]);
	__u16 dport = bpf_ntohs(ports[1]);

	struct df_config *cfg = config();
	/* A raw socket writes any source port: it could claim another socket's origin. Its
	 * packets to the proxy record nothing and are judged like the rest of its packets. */
	if (cfg && !raw && (protocol == IPPROTO_TCP || protocol == IPPROTO_UDP)) {
		const struct df_addr *proxy = proxy_for(cfg, &dst);
		if (proxy && addr_eq(&dst, proxy) && dport == cfg->port) {
			/* A query on its way to the proxy: say who sent it (endpoint 0: a process
			 * of no endpoint, so a stale entry of an earlier socket on this port is
			 * overwritten) and to whom. Recorded before the packet can reach the
			 * proxy's socket. */
			if (protocol == IPPROTO_UDP || (tcp_flags & 0x02)) {
				struct df_origin_key k = {};
				struct df_origin o = {};
				struct df_dst *orig = sk ? sock_server(skb, sk) : 0;
				k.addr = src;
				k.port = sport;
				k.proto = (__u8)protocol;
				o.endpoint = ep ? ep->key : 0;
				o.cgroup = ep ? cgroup : 0;
				if (orig) {
					o.server = orig->addr;
					o.server_port = orig->port;
				}
				/* else: sent to the proxy's own address, no server to judge by (port
				 * 0): the proxy takes its configured policy server. */
				bpf_map_update_elem(&df_origin, &k, &o, BPF_ANY);
				count(DF_STAT_ORIGINS);
			}
			return 1;
		}
	}
	if (!enforce || !ep)
		return 1;

	if (protocol == IPPROTO_TCP) {
		/* New connections only (SYN without ACK): established ones survive expiry. A raw
		 * socket has no connection: all its segments are judged (an ACK or RST written by
		 * hand would otherwise reach any address). */
		if (!raw && (!(tcp_flags & 0x02) || (tcp_flags & 0x10)))
			return 1;
	} else if (protocol == IPPROTO_UDP) {
		/* Datagram sockets were judged by connect/sendmsg; raw ones are judged here. */
		if (sk && sk->type == 2 /* SOCK_DGRAM */)
			return 1;
	} else if ((protocol == IPPROTO_ICMP && skb->protocol == bpf_htons(ETH_P_IP)) ||
		   (protocol == IPPROTO_ICMPV6 && skb->protocol == bpf_htons(ETH_P_IPV6))) {
		/* ICMP of any socket (ping, raw) is judged per packet by its type, which the
		 * specs of icmps rules carry where a port would be. */
		__u8 type;
		if (bpf_skb_load_bytes(skb, l4, &type, 1)) {
			count(DF_STAT_SKB_DENIED);
			return 0;
		}
		__u8 bit = protocol == IPPROTO_ICMP ? DF_PROTO_ICMP : DF_PROTO_ICMPV6;
		if (permitted(ep, &dst, type, bit))
			return 1;
		count(DF_STAT_SKB_DENIED);
		return 0;
	} else {
		count(DF_STAT_SKB_DENIED);
		return 0;
	}
	if (permitted(ep, &dst, dport, proto_bit(protocol)))
		return 1;
	count(DF_STAT_SKB_DENIED);
	return 0;
}

static __always_inline __u32 reuse_active(__u32 group, __u32 owner)
{
	__u32 key = group * 2 + owner;
	struct df_reuse_owner *o = bpf_map_lookup_elem(&df_reuse_state, &key);
	return o ? o->active : 0;
}

/* Whether an owner beat within DF_REUSE_STALE_NS (or never beat: a process older than the
 * heartbeat). */
static __always_inline int reuse_alive(__u32 owner, __u64 now)
{
	__u64 *beat = bpf_map_lookup_elem(&df_reuse_alive, &owner);
	return !beat || !*beat || now - *beat <= DF_REUSE_STALE_NS || *beat > now;
}

/* Picks the socket of a new datagram (UDP), connection (TCP SYN) or migrated request (a
 * closing listener's accept queue) among the active slots of its group, by the packet's hash:
 * a draining socket gets nothing new. With no active slot (or none that selects) the program
 * selects nothing and passes: the kernel then picks by hash among all the group's sockets,
 * draining ones included, so a process left alone keeps serving rather than dropping. */
/* Selects, by the packet's hash, one of the sockets of `mask` (bit i: slot i of the group);
 * whether one was selected (a set bit whose socket is gone selects nothing: the next set
 * bits are tried). */
static __always_inline int reuse_select(struct sk_reuseport_md *md, __u32 group, __u64 mask)
{
	__u32 n = __builtin_popcountll(mask);
	if (!n)
		return 0;
	__u32 skip = md->hash % n;
	for (__u32 i = 0; i < DF_REUSE_GROUP_SLOTS; i++) {
		if (!((mask >> i) & 1))
			continue;
		if (skip) {
			skip--;
			continue;
		}
		__u32 slot = group * DF_REUSE_GROUP_SLOTS + i;
		if (bpf_sk_select_reuseport(md, &df_reuse_socks, &slot, 0) == 0)
			return 1;
	}
	/* The hashed socket and those after it are gone: the ones before it (review finding:
	 * the search did not wrap, and the packet fell to the kernel's choice, draining sockets
	 * included). */
	for (__u32 i = 0; i < DF_REUSE_GROUP_SLOTS; i++) {
		if (!((mask >> i) & 1))
			continue;
		__u32 slot = group * DF_REUSE_GROUP_SLOTS + i;
		if (bpf_sk_select_reuseport(md, &df_reuse_socks, &slot, 0) == 0)
			return 1;
	}
	return 0;
}

SEC("sk_reuseport/migrate")
int df_reuseport(struct sk_reuseport_md *md)
{
	struct bpf_sock *sk = md->sk;
	__u32 group = (sk->protocol == IPPROTO_TCP ? 2 : 0) + (sk->family == AF_INET6 ? 1 : 0);
	__u32 zero = 0;
	__u64 agent = reuse_active(group, 0);
	__u64 proxy = reuse_active(group, 1);
	/* A silent owner (crashed: its sockets linger while the kernel tears it down; or hung)
	 * gets nothing new while the other has active sockets. */
	__u64 now = bpf_ktime_get_boot_ns();
	if (agent && proxy) {
		if (!reuse_alive(0, now))
			agent = 0;
		else if (!reuse_alive(1, now))
			proxy = 0;
	}
	struct df_reuse_conf *conf = bpf_map_lookup_elem(&df_reuse_conf, &zero);
	if (conf && conf->mode == DF_REUSE_PREFER_AGENT && agent) {
		/* The agent's sockets; if none of them can be selected (all gone), the proxy's. */
		if (reuse_select(md, group, agent))
			return SK_PASS;
		reuse_select(md, group, proxy << DF_REUSE_OWNER_SLOTS);
		return SK_PASS;
	}
	reuse_select(md, group, agent | proxy << DF_REUSE_OWNER_SLOTS);
	return SK_PASS;
}
