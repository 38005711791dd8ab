// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * Steering at tc ingress (tcx): keep the kernel away from the frames pylvs
 * steals. The AF_PACKET taps have already copied the frame to pylvs when
 * this runs (ptype_all taps come before tc ingress in
 * __netif_receive_skb_core), so TCX_DROP leaves pylvs the only one handling
 * it: the kernel neither forwards it nor answers it with a RST or an ICMP
 * error.
 *
 * The rules are those of the nft table of pylvs/control/steering.py (its
 * docstring says why each exists); the sets are the hash maps below, which
 * control rewrites on every table change without reloading this program.
 * The program is attached through a BPF link that only the director holds
 * (never pinned): when the director dies the kernel detaches it and the
 * kernel handles the VIP traffic again.
 *
 * Keys are in network byte order, as on the wire.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "steer_key.h"

/* tcx verdicts (linux/bpf.h TCX_PASS, TCX_DROP; the same numbers as
 * TC_ACT_OK and TC_ACT_SHOT, which older headers have). */
#define VERDICT_PASS TC_ACT_OK
#define VERDICT_DROP TC_ACT_SHOT

#define IP_OFFSET 0x1fff  /* fragment offset, in 8-byte units */
#define PACKET_HOST 0

/* The sets control fills (steer_key.h). */
STEER_SETS();

/* (caddr, cport, proto) of clients on the director itself, learnt from
 * their requests at ingress of the loopback port (docs/io.md, "Clients on
 * the director"): a real server's reply to one of them (to a local
 * address) is the engine's, not the kernel's, which would answer it with a
 * RST (NAT: no socket has that peer) or drop it (DR/Tun: its source, the
 * VIP, is local). LRU: a client's entry goes when newer ones need room. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct l4_key);
	__type(value, __u8);
} local_clients SEC(".maps");

/* Every network namespace's loopback device has this ifindex
 * (include/net/flow.h LOOPBACK_IFINDEX). */
#define LOOPBACK_IFINDEX 1

/* [0]: not_host, frames of the sets above whose packet type is not
 * PACKET_HOST (the socket filter refuses them, pylvs/io/bpf.py). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

static __always_inline int in_set(void *map, const void *key)
{
	return bpf_map_lookup_elem(map, key) != NULL;
}

/* The ICMP errors IPVS relates to a conn (ip_vs_in_icmp, ip_vs_out_icmp). */
static __always_inline int icmp_error(__u8 type)
{
	return type == 3 || type == 4 || type == 11;
}

SEC("tc")
int pylvs_steer(struct __sk_buff *skb)
{
	struct iphdr iph;
	struct l4_key svc = {}, rs = {};
	__u8 l4[4];
	int is_icmp_error = 0;
	__u32 ihl;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return VERDICT_PASS;
	/* At tc ingress skb->data is the Ethernet header. */
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &iph, sizeof(iph)))
		return VERDICT_PASS;
	ihl = iph.ihl * 4;
	if (iph.version != 4 || ihl < sizeof(iph))
		return VERDICT_PASS;
	/* A non-first fragment carries no ports (nft's "th" does not match
	 * it either): the kernel reassembles or drops it. */
	if (iph.frag_off & bpf_htons(IP_OFFSET))
		return VERDICT_PASS;
	if (bpf_skb_load_bytes(skb, ETH_HLEN + ihl, l4, sizeof(l4)))
		return VERDICT_PASS;

	svc.addr = iph.daddr;
	svc.proto = iph.protocol;
	__builtin_memcpy(&svc.port, &l4[2], 2);
	rs.addr = iph.saddr;
	rs.proto = iph.protocol;
	__builtin_memcpy(&rs.port, &l4[0], 2);
	if (iph.protocol == IPPROTO_ICMP)
		is_icmp_error = icmp_error(l4[0]);

	if (skb->pkt_type != PACKET_HOST) {
		/* IPVS ignores it (ip_vs_in_hook); counted, left to the kernel. */
		if (steer_l4_in(&services, &svc) || steer_l4_in(&realservers, &rs)
		    || (is_icmp_error && (in_set(&vips, &iph.daddr)
					  || in_set(&rsaddrs, &iph.saddr)))) {
			__u32 zero = 0;
			__u64 *n = bpf_map_lookup_elem(&counters, &zero);

			if (n)
				*n += 1;
		}
		return VERDICT_PASS;
	}
	if (steer_l4_in(&services, &svc)) {
		if (skb->ifindex == LOOPBACK_IFINDEX) {
			struct l4_key cl = {.addr = iph.saddr, .proto = iph.protocol};
			__u8 one = 1;

			__builtin_memcpy(&cl.port, &l4[0], 2);
			bpf_map_update_elem(&local_clients, &cl, &one, BPF_ANY);
		}
		return VERDICT_DROP;
	}
	if (in_set(&local, &iph.daddr)) {
		/* A NAT real server's reply, or a DR/Tun one (from the VIP), to
		 * a client on the director; the director's own connections to
		 * the real servers stay the kernel's. */
		struct l4_key cl = {.addr = iph.daddr, .proto = iph.protocol};

		__builtin_memcpy(&cl.port, &l4[2], 2);
		if (skb->ifindex != LOOPBACK_IFINDEX && in_set(&local_clients, &cl)
		    && (steer_l4_in(&realservers, &rs) || steer_l4_in(&services, &rs)))
			return VERDICT_DROP;
		return VERDICT_PASS;
	}
	if (steer_l4_in(&realservers, &rs))
		return VERDICT_DROP;
	if (is_icmp_error && in_set(&rsaddrs, &iph.saddr))
		return VERDICT_DROP;
	return VERDICT_PASS;
}

char LICENSE[] SEC("license") = "GPL";
