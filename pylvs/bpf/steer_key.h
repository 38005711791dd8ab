/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The keys of steering's sets, and the worker of a frame in eBPF: the rule
 * of pylvs.io.bpf.fanout_program and steer_index (docs/io.md, "Workers"),
 * plan included (bpf.fanout_plan: the classic program's fallbacks for
 * tables too big for it, which this one follows so that every backend
 * sends a client to the same worker), for programs that see the frame from
 * its Ethernet header.
 *
 * For steer_client_mix the includer defines, before including this file:
 *   STEER_CTX                    the program's context type;
 *   STEER_LOAD(ctx, off, p, n)   copy n bytes at offset off of the frame
 *                                to p; 0 on success (bpf_skb_load_bytes,
 *                                bpf_xdp_load_bytes);
 * and, for a program that sees the packet from its IP header (the AF_PACKET
 * fanout program: fanout demux runs on the skb at its network header):
 *   STEER_L3                     the IP header's offset (default ETH_HLEN);
 *   STEER_IS_IPV4(ctx)           true for an IPv4 packet (default: the
 *                                Ethernet type at offset 12 is IPv4);
 * and passes steer_client_mix the plan and its hash maps, filled as
 * pylvs.control.steering's sync_sets fills them from sets_of: `services`
 * (proto, VIP, vport of every virtual service) and `realservers` (proto,
 * RIP, rport of the dests whose replies pass the director) of struct
 * l4_key; `vips` and `rsaddrs`, their addresses (__be32).
 */
#ifndef PYLVS_STEER_KEY_H
#define PYLVS_STEER_KEY_H

#include <linux/if_ether.h>
#include <linux/in.h>
#include <bpf/bpf_endian.h>

#define STEER_MIX 0x9E3779B1u   /* bpf.FANOUT_MIX */
#define STEER_PROTO_IPIP 4

/* bpf.fanout_plan's plans, by the codes of pylvs/io/xdp.py PLANS. */
#define STEER_PLAN_KEYS 0
#define STEER_PLAN_ADDRS 1
#define STEER_PLAN_SADDR 2

/* (addr, port, proto) of a service or a dest, in network byte order: the
 * key of steering's maps (pylvs/control/steering.py _l4_keys packs it). */
struct l4_key {
	__be32 addr;
	__be16 port;
	__u8 proto;
	__u8 pad;  /* always 0: part of the hashed key */
};

/* A set: a hash map of key_t (value: 1), sized by the loader before load
 * (the director's limits). */
#define STEER_SET(name, key_t)                          \
	struct {                                        \
		__uint(type, BPF_MAP_TYPE_HASH);        \
		__uint(map_flags, BPF_F_NO_PREALLOC);   \
		__uint(max_entries, 1024);              \
		__type(key, key_t);                     \
		__type(value, __u8);                    \
	} name SEC(".maps")

/* The sets the tcx steering and the XDP programs both read, filled by
 * control (pylvs/control/steering.py sets_of): (addr, port, proto) of the
 * virtual services and of the VS-NAT dests (struct l4_key), the dests'
 * addresses, the VIPs, the director's own addresses. */
/* [0]: the address bits steering ignores, host order: ~bpf.client_mask,
 * the AND of the persistent services' -M netmasks, so that every client
 * one template covers (caddr & netmask) reaches the worker holding it; 0
 * (/32, also before control first writes it): none. */
#define STEER_MASK()                                    \
	struct {                                        \
		__uint(type, BPF_MAP_TYPE_ARRAY);       \
		__uint(max_entries, 1);                 \
		__type(key, __u32);                     \
		__type(value, __u32);                   \
	} steer_mask SEC(".maps")

/* The client address (host order) as steering mixes it. */
static __always_inline __u32 steer_masked(void *mask_map, __u32 client)
{
	__u32 zero = 0, *hostbits = bpf_map_lookup_elem(mask_map, &zero);

	return hostbits ? client & ~*hostbits : client;
}

/* A (proto, addr, port) set holds the key or its port-0 wildcard: a port-0
 * service takes every port (the kernel's ip_vs_service_find falls back to
 * it), and its dests, given port 0, answer from the client's port. */
static __always_inline int steer_l4_in(void *map, const struct l4_key *k)
{
	struct l4_key any = *k;

	if (bpf_map_lookup_elem(map, k))
		return 1;
	if (!k->port)
		return 0;
	any.port = 0;
	return bpf_map_lookup_elem(map, &any) != NULL;
}

#define STEER_SETS()                                    \
	STEER_SET(services, struct l4_key);             \
	STEER_SET(realservers, struct l4_key);          \
	STEER_SET(rsaddrs, __be32);                     \
	STEER_SET(vips, __be32);                        \
	STEER_SET(local, __be32)

#ifdef STEER_LOAD

#ifndef STEER_L3
#define STEER_L3 ETH_HLEN
#endif

#ifndef STEER_IS_IPV4
#define STEER_IS_IPV4(ctx) steer_eth_ipv4(ctx)
static __always_inline int steer_eth_ipv4(STEER_CTX *ctx)
{
	__be16 etype;

	return !STEER_LOAD(ctx, 12, &etype, 2) && etype == bpf_htons(ETH_P_IP);
}
#endif

/* The 16-bit mix of a client address (host order): bpf.fanout_mix. */
static __always_inline __u32 steer_mix(__u32 client)
{
	return (client * STEER_MIX) >> 16;
}

/* The ICMP types whose quoted header names the conn (ip_vs_in_icmp). */
static __always_inline int steer_icmp_error(__u8 type)
{
	return type == 3 || type == 4 || type == 11;
}

/* steer_mix of the frame's client address, masked (steer_masked); 0 for
 * anything but IPv4 and whenever a field the rule needs lies beyond the frame (as the cBPF
 * program's failed loads end it with 0). Offsets below are from the IP
 * header at STEER_L3. */
static __always_inline __u32 steer_client(STEER_CTX *ctx, __u32 plan, void *services,
					     void *realservers, void *vips, void *rsaddrs);

static __always_inline __u32 steer_client_mix(STEER_CTX *ctx, __u32 plan, void *services,
						 void *realservers, void *vips, void *rsaddrs,
						 void *mask_map)
{
	return steer_mix(steer_masked(mask_map,
				      steer_client(ctx, plan, services, realservers, vips, rsaddrs)));
}

/* The frame's client address (host order) by the rule above; 0 where the
 * rule cannot read what it needs. */
static __always_inline __u32 steer_client(STEER_CTX *ctx, __u32 plan, void *services,
					     void *realservers, void *vips, void *rsaddrs)
{
	struct {
		__u8 proto;
		__u8 csum[2];
		__be32 saddr;
		__be32 daddr;
	} __attribute__((packed)) h;
	struct l4_key to = {}, from = {};
	__be16 ports[2] = {0, 0};
	__u8 b;
	__u32 base = 0, off;

	if (!STEER_IS_IPV4(ctx))
		return 0;
	if (STEER_LOAD(ctx, STEER_L3 + 9, &b, 1))
		return 0;
	if (b == IPPROTO_ICMP) {
		/* An ICMP error is keyed by the header it quotes, and an error
		 * about a tunnel packet by the client's packet inside. */
		if (STEER_LOAD(ctx, STEER_L3, &b, 1))
			return 0;
		off = (b & 0x0f) * 4;
		if (STEER_LOAD(ctx, STEER_L3 + off, &b, 1))
			return 0;
		if (steer_icmp_error(b)) {
			base = off + 8;
			if (STEER_LOAD(ctx, STEER_L3 + base + 9, &b, 1))
				return 0;
			if (b == STEER_PROTO_IPIP) {
				if (STEER_LOAD(ctx, STEER_L3 + base, &b, 1))
					return 0;
				base += (b & 0x0f) * 4;
			}
		}
	}
	if (base > 0xffff || STEER_LOAD(ctx, STEER_L3 + base + 9, &h, sizeof(h)))
		return 0;
	if (h.proto == IPPROTO_TCP || h.proto == IPPROTO_UDP) {
		if (STEER_LOAD(ctx, STEER_L3 + base, &b, 1))
			return 0;
		off = base + (b & 0x0f) * 4;
		if (STEER_LOAD(ctx, STEER_L3 + off, ports, sizeof(ports)))
			return 0;
	}
	if (plan == STEER_PLAN_SADDR)
		return bpf_ntohl(h.saddr);
	if (plan == STEER_PLAN_ADDRS) {
		if (bpf_map_lookup_elem(vips, &h.daddr))
			return bpf_ntohl(h.saddr);
		if (bpf_map_lookup_elem(vips, &h.saddr) || bpf_map_lookup_elem(rsaddrs, &h.saddr))
			return bpf_ntohl(h.daddr);
		return bpf_ntohl(h.saddr);
	}
	to.addr = h.daddr;
	to.port = ports[1];
	to.proto = h.proto;
	from.addr = h.saddr;
	from.port = ports[0];
	from.proto = h.proto;
	/* Client to VIP: the source. A reply from the VIP or a NAT dest: the
	 * destination. Anything else: the source. */
	if (steer_l4_in(services, &to))
		return bpf_ntohl(h.saddr);
	if (steer_l4_in(services, &from) || steer_l4_in(realservers, &from))
		return bpf_ntohl(h.daddr);
	return bpf_ntohl(h.saddr);
}

#endif /* STEER_LOAD */

#endif
