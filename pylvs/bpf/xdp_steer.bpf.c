// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * XDP: hand the director's frames to its AF_XDP sockets (pylvs run --io xdp).
 *
 * A frame redirected to an XSK never becomes an skb: the kernel's stack,
 * its taps and tc never see it. So this program redirects exactly the
 * frames the steering program (steer.bpf.c) would drop after the engine
 * took its copy, the frames that are the engine's alone:
 *
 *   - to this interface's MAC (IPVS ignores other packet types,
 *     ip_vs_in_hook), IPv4, not a non-first fragment, and
 *   - (daddr, dport, proto) is a virtual service, or
 *   - daddr is not one of the director's addresses (`local`) and either
 *     (saddr, sport, proto) is a VS-NAT dest (a real server's reply) or it
 *     is an ICMP error (types 3, 4, 11) from a VS-NAT dest's address.
 *
 * Everything else is XDP_PASS. The frames that both the engine and the
 * kernel need (ICMP errors to a VIP or to the director's own addresses, a
 * real server's reply to the director itself) are passed, and the backend
 * takes the engine's copy from an AF_PACKET tap as in the AF_PACKET mode
 * (pylvs/io/xdp.py). So whatever the engine then decides, pass included,
 * the kernel's share is what it is with AF_PACKET plus steering.
 *
 * The sets are the hash maps below, rewritten by control on every table
 * change (no reload). `ports` maps an ifindex to its MAC and its slot.
 *
 * Workers: each of the N workers has an XSK on (slot, rx queue), at
 * xsks[(slot * MAX_QUEUES + queue) * N + worker]. The worker is chosen by
 * the function the AF_PACKET fanout program computes (pylvs/io/bpf.py
 * fanout_program and steer_index, docs/io.md "Workers"): a mix of the
 * frame's client address modulo N, so both directions of a conn, and every
 * conn of a client, reach the worker whose engine holds them, whichever
 * way in (XSK or AF_PACKET tap) a frame takes. `steer` holds N and how the
 * key is matched (the fanout program's plan: full keys, addresses only,
 * or saddr), set by control with the sets. A frame whose queue has no XSK
 * falls back to XDP_PASS (bpf_redirect_map's default), where steering and
 * the AF_PACKET taps treat it as before.
 *
 * Counters (per-CPU, [index]): 0 redirected, 1 no_xsk (redirect fell back
 * to the stack), 2 + w: frames steered to worker w (counted before the
 * redirect). Frames of the sets to another MAC are passed, and counted by
 * steering (not_host), which sees them next.
 *
 * The program is attached through a BPF link only the director holds: the
 * kernel detaches it when the director dies.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "steer_key.h"   /* struct l4_key, STEER_SET */

#define IP_OFFSET 0x1fff
#define MAX_QUEUES 64
#define MAX_WORKERS 256
#define IPPROTO_IPIP_ 4
#define FANOUT_MIX 0x9E3779B1u   /* pylvs/io/bpf.py FANOUT_MIX */

/* steer.plan: pylvs/io/bpf.py FANOUT_FULL, FANOUT_ADDRS, FANOUT_SADDR */
#define PLAN_KEYS 0
#define PLAN_ADDRS 1
#define PLAN_SADDR 2

struct steer_cfg {
	__u32 workers;
	__u32 plan;
};

struct port_info {
	__u8 mac[6];
	__u16 slot;
};

/* The sets control fills (steer_key.h). */
STEER_SETS();
STEER_MASK();

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct steer_cfg);
} steer SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, struct port_info);
} ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, 64 * MAX_QUEUES);   /* sized at load: ports * MAX_QUEUES * N */
	__type(key, __u32);
	__type(value, __u32);
} xsks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2 + MAX_WORKERS);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

static __always_inline void count(__u32 i)
{
	__u64 *n = bpf_map_lookup_elem(&counters, &i);

	if (n)
		*n += 1;
}

static __always_inline int in_set(void *map, const void *key)
{
	return bpf_map_lookup_elem(map, key) != NULL;
}

static __always_inline int icmp_error(__u8 type)
{
	return type == 3 || type == 4 || type == 11;
}

static __always_inline int same_mac(const __u8 *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2]
	    && a[3] == b[3] && a[4] == b[4] && a[5] == b[5];
}

/* The client address (host order) of the IPv4 packet at ip, by the fanout
 * program's rule (pylvs/io/bpf.py fanout_program): an ICMP error is keyed
 * by the header it quotes, or by the header inside when that is IPIP; of
 * the header keyed, saddr when (proto, daddr, dport) is a service, daddr
 * when (proto, saddr, sport) is a service or a VS-NAT dest, else saddr
 * (plan ADDRS: the same with addresses only; SADDR: saddr). Ports are read
 * for TCP and UDP only. 0 where a read would pass the end of the frame,
 * as the classic BPF program returns 0 there. */
static __always_inline __u32 client_of(__u8 *ip, void *end, __u32 plan)
{
	struct l4_key svc = {}, frm = {};
	__u8 *h = ip, *l4;
	__be32 saddr, daddr;
	__u8 proto;

	if ((void *)(ip + 20) > end)
		return 0;
	if (ip[9] == IPPROTO_ICMP) {
		__u8 *icmp = ip + ((ip[0] & 0x0f) << 2);

		if ((void *)(icmp + 1) > end)
			return 0;
		if (icmp_error(icmp[0])) {
			h = icmp + 8;
			if ((void *)(h + 10) > end)
				return 0;
			if (h[9] == IPPROTO_IPIP_)
				h += (h[0] & 0x0f) << 2;
		}
	}
	if ((void *)(h + 20) > end)
		return 0;
	proto = h[9];
	__builtin_memcpy(&saddr, h + 12, 4);
	__builtin_memcpy(&daddr, h + 16, 4);
	if (proto == IPPROTO_TCP || proto == IPPROTO_UDP) {
		l4 = h + ((h[0] & 0x0f) << 2);
		if ((void *)(l4 + 4) > end)
			return 0;
		__builtin_memcpy(&frm.port, l4, 2);
		__builtin_memcpy(&svc.port, l4 + 2, 2);
	}
	if (plan == PLAN_SADDR)
		return bpf_ntohl(saddr);
	if (plan == PLAN_ADDRS) {
		if (in_set(&vips, &daddr))
			return bpf_ntohl(saddr);
		if (in_set(&vips, &saddr) || in_set(&rsaddrs, &saddr))
			return bpf_ntohl(daddr);
		return bpf_ntohl(saddr);
	}
	svc.addr = daddr;
	svc.proto = proto;
	if (steer_l4_in(&services, &svc))
		return bpf_ntohl(saddr);
	frm.addr = saddr;
	frm.proto = proto;
	if (steer_l4_in(&services, &frm) || steer_l4_in(&realservers, &frm))
		return bpf_ntohl(daddr);
	return bpf_ntohl(saddr);
}

/* The worker of this frame, 0..workers-1 (fanout_mix(client) % N). */
static __always_inline __u32 worker_of(__u8 *ip, void *end, struct steer_cfg *cfg)
{
	__u32 client;

	if (!cfg || cfg->workers <= 1)
		return 0;
	client = steer_masked(&steer_mask, client_of(ip, end, cfg->plan));
	return ((client * FANOUT_MIX) >> 16) % cfg->workers;
}

SEC("xdp")
int pylvs_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *iph;
	struct l4_key svc = {}, rs = {};
	struct port_info *pi;
	__u8 *l4;
	__u32 ifindex = ctx->ingress_ifindex, ihl, key, zero = 0, worker, n;
	struct steer_cfg *cfg;
	int ours;

	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	iph = (void *)(eth + 1);
	if ((void *)(iph + 1) > end)
		return XDP_PASS;
	ihl = iph->ihl * 4;
	if (iph->version != 4 || ihl < sizeof(*iph) || (iph->frag_off & bpf_htons(IP_OFFSET)))
		return XDP_PASS;
	l4 = (__u8 *)iph + ihl;
	if ((void *)(l4 + 4) > end)
		return XDP_PASS;
	svc.addr = iph->daddr;
	svc.proto = iph->protocol;
	__builtin_memcpy(&svc.port, l4 + 2, 2);
	rs.addr = iph->saddr;
	rs.proto = iph->protocol;
	__builtin_memcpy(&rs.port, l4, 2);

	ours = steer_l4_in(&services, &svc);
	if (!ours && !in_set(&local, &iph->daddr))
		ours = steer_l4_in(&realservers, &rs)
		    || (iph->protocol == IPPROTO_ICMP && icmp_error(l4[0])
			&& in_set(&rsaddrs, &iph->saddr));
	if (!ours)
		return XDP_PASS;
	pi = bpf_map_lookup_elem(&ports, &ifindex);
	if (!pi)
		return XDP_PASS;
	if (!same_mac(eth->h_dest, pi->mac))
		return XDP_PASS;
	if (ctx->rx_queue_index >= MAX_QUEUES) {
		count(1);
		return XDP_PASS;
	}
	cfg = bpf_map_lookup_elem(&steer, &zero);
	worker = worker_of((__u8 *)iph, end, cfg);
	n = cfg && cfg->workers > 1 ? cfg->workers : 1;
	count(2 + (worker & (MAX_WORKERS - 1)));
	key = ((__u32)pi->slot * MAX_QUEUES + ctx->rx_queue_index) * n + worker;
	if (!bpf_map_lookup_elem(&xsks, &key)) {
		count(1);
		return XDP_PASS;
	}
	count(0);
	return bpf_redirect_map(&xsks, key, XDP_PASS);
}

char LICENSE[] SEC("license") = "GPL";
