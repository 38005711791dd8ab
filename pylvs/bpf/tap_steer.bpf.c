// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * Which TAP queue (which worker) a frame the kernel sends to a pylvs TAP
 * goes to: set on the device with TUNSETSTEERINGEBPF (pylvs/io/tap.py).
 *
 * drivers/net/tun.c runs it as the device's ndo_select_queue, in the
 * transmit path: the frame starts at its Ethernet header (the virtio_net
 * header is only made when pylvs reads the frame), and the value returned,
 * taken modulo the number of queues attached, is the queue. Worker i owns
 * queue i of every TAP, so returning steer_mix of the client address (the
 * rule of the AF_PACKET fanout program, steer_key.h) sends both directions
 * of a conn, and all conns of a client, to the worker that holds them.
 * Frames without a client address (ARP, IPv6) go to queue 0.
 *
 * The program type is a socket filter (the only type the ioctl takes).
 * The tun device holds the program: it stays attached while the device
 * exists, so pylvs detaches it when it stops (a persistent TAP is left as
 * found) and replaces a leftover one when it starts.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define STEER_CTX struct __sk_buff
#define STEER_LOAD(ctx, off, p, n) bpf_skb_load_bytes(ctx, off, p, n)
#include "steer_key.h"

STEER_SET(services, struct l4_key);
STEER_SET(realservers, struct l4_key);
STEER_SET(vips, __be32);
STEER_SET(rsaddrs, __be32);
STEER_MASK();

SEC("socket")
int pylvs_tap_steer(struct __sk_buff *skb)
{
	return steer_client_mix(skb, STEER_PLAN_KEYS, &services, &realservers, &vips, &rsaddrs,
				&steer_mask);
}

char LICENSE[] SEC("license") = "GPL";
