// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * The AF_PACKET fanout program (PACKET_FANOUT_EBPF): which member of a
 * port's fanout group, i.e. which worker (and which of its two rings), a
 * received frame goes to. Set on every group by pylvs/io/afpacket.py
 * (FanoutSteering) through PACKET_FANOUT_DATA; the groups hold it.
 *
 * The rule is steer_key.h's, the one the XDP and TAP programs follow and
 * pylvs.io.bpf.steer_index writes out in Python: the client address of the
 * frame, mixed. Its sets are hash maps, so unlike the classic program
 * (bpf.fanout_program, limited to BPF_MAXINSNS instructions, which for big
 * tables fell back to keying by addresses, then by source address alone)
 * it keys by (proto, addr, port) whatever the number of services.
 *
 * af_packet.c runs it on the skb at its network header (fanout demux) and
 * takes the value modulo the group's members. `conf` says how members are
 * numbered: without lanes one per worker (the value is the mix); with the
 * adaptive ring two per worker, its V3 ring then its V2 lane, and the value
 * is (mix % workers) * 2 + lane, the lane being control's choice of ring
 * (LaneSwitch), changed by one map update.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define STEER_CTX struct __sk_buff
#define STEER_LOAD(ctx, off, p, n) bpf_skb_load_bytes(ctx, off, p, n)
#define STEER_L3 0
#define STEER_IS_IPV4(ctx) ((ctx)->protocol == bpf_htons(ETH_P_IP))
#include "steer_key.h"

STEER_SET(services, struct l4_key);
STEER_SET(realservers, struct l4_key);
STEER_SET(vips, __be32);
STEER_SET(rsaddrs, __be32);
STEER_MASK();

/* [0]: set by control (FanoutSteering). */
struct fanout_conf {
	__u32 workers;  /* members are numbered per worker (>= 1) */
	__u32 lanes;    /* 1: two members per worker (V3 ring, V2 lane) */
	__u32 lane;     /* with lanes: 0 the V3 rings, 1 the V2 lanes */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct fanout_conf);
} conf SEC(".maps");

SEC("socket")
int pylvs_fanout(struct __sk_buff *skb)
{
	__u32 zero = 0, mix;
	struct fanout_conf *c = bpf_map_lookup_elem(&conf, &zero);

	if (!c)
		return 0;
	mix = steer_client_mix(skb, STEER_PLAN_KEYS, &services, &realservers, &vips, &rsaddrs,
			       &steer_mask);
	if (!c->lanes || !c->workers)
		return mix;
	return (mix % c->workers) * 2 + (c->lane & 1);
}

char LICENSE[] SEC("license") = "GPL";
