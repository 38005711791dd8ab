/* Frames the engine makes (ICMP errors, TCP resets, IPv4 fragments) and the
 * NAT of ICMP errors that quote a tracked flow.
 *
 * The pure-Python twins, byte for byte the same, are in
 * pylvs/engine/icmp.py; tests/test_icmp.py holds both to scapy and to each
 * other. Conventions for every function below:
 *
 * - `ip` points at an IPv4 header and `ip_len` bytes from it are readable:
 *   the caller (the engine) has already checked the header (version, IHL,
 *   total length within the frame) and passes the total length. Functions
 *   still refuse inconsistent headers rather than read past ip_len.
 * - `eth` points at the 14-byte Ethernet header of the same frame.
 * - Addresses and ports are host order; every multi-byte field written is
 *   network order.
 * - An emitted frame is a 10-byte all-zero virtio_net_hdr followed by a
 *   complete Ethernet frame with every checksum full.
 */
#ifndef PYLVS_IP_VS_ICMP_H
#define PYLVS_IP_VS_ICMP_H

#ifndef PY_SSIZE_T_CLEAN
#define PY_SSIZE_T_CLEAN
#endif
#include <Python.h>
#include <stdint.h>

/* The emit area: frames the engine creates, appended one after the other in
 * `buf`. Frame i is buf[off[i] : off[i] + len[i]], to leave on port[i]. The
 * Python Batch holds the same arrays (emit_buf, emit_off, emit_len,
 * emit_port, emit_n = (n, used)). */
struct pylvs_emit {
    uint8_t *buf; uint32_t cap, used;     /* bytes */
    uint32_t n, max;                      /* frames */
    uint32_t *off, *len; uint16_t *port;  /* per frame */
};

/* Room for one frame of `len` bytes (vnet header included) to leave on
 * `port`; NULL (and nothing changed) when em is NULL, or buf or the frame
 * slots are full. */
uint8_t *pylvs_emit_reserve(struct pylvs_emit *em, uint32_t len, uint16_t port);

/* Largest ICMP error datagram, IP header included (kernel icmp_send,
 * RFC 1812 4.3.2.3). */
#define PYLVS_ICMP_ERR_MAX 576
#define PYLVS_EMIT_TTL 64

/* uint32_t pylvs_icmp_error(struct pylvs_emit *em, uint16_t port,
 *         const uint8_t *eth, const uint8_t *ip, uint32_t ip_len,
 *         uint8_t type, uint8_t code, uint32_t info, uint32_t saddr,
 *         uint16_t ip_id);
 *
 * Emit on `port` an ICMP error (type, code; `info` = the 32-bit word after
 * the checksum, e.g. the next-hop MTU in its low 16 bits for frag-needed,
 * RFC 1191) about the IPv4 packet at `ip`, from `saddr` to that packet's
 * source. IP: ID ip_id, TTL 64, DF clear, TOS (orig & 0x1e) | 0xc0, no
 * options (the kernel's ip_options_echo would return a record-route or
 * timestamp option of the packet; not done here). Quotes the packet's first bytes (options included) so the whole
 * IP datagram is at most 576 bytes. Ethernet: dst = eth's src, src = eth's
 * dst. Returns the frame length written (vnet header included), or 0 when
 * nothing was emitted: no room, a malformed header, or a packet the kernel
 * never answers (icmp_send, RFC 1122 3.2.2): a non-first fragment; an ICMP
 * error (or a truncated ICMP header) when `type` is an error type; a
 * destination that is multicast, 255.255.255.255 or 0.0.0.0; a source that
 * is not one host (0/8, 127/8, multicast, 240/4 with broadcast). */
uint32_t pylvs_icmp_error(struct pylvs_emit *em, uint16_t port, const uint8_t *eth,
                          const uint8_t *ip, uint32_t ip_len, uint8_t type, uint8_t code,
                          uint32_t info, uint32_t saddr, uint16_t ip_id);

/* uint32_t pylvs_tcp_reset(struct pylvs_emit *em, uint16_t port,
 *         const uint8_t *eth, const uint8_t *ip, const uint8_t *tcp,
 *         uint32_t tcp_len);
 *
 * Emit on `port` the RST the kernel's tcp_v4_send_reset gives a segment
 * (at `tcp`, tcp_len = IP total length - IHL*4) that matches no socket:
 * ACK set: seq = seg.ack, flags RST; else seq 0, flags RST|ACK, ack =
 * seg.seq + payload + SYN + FIN. Addresses and ports swapped, window 0, no
 * options (IP options not echoed either); IP ID 0, DF set, TTL 64, TOS
 * orig & ~3 (ECN cleared). Ethernet as
 * pylvs_icmp_error. Returns the frame length (64) or 0: no room, the
 * segment is a RST, its data offset is < 5 or beyond tcp_len, or its
 * addresses are not unicast hosts (the same rule as pylvs_icmp_error). */
uint32_t pylvs_tcp_reset(struct pylvs_emit *em, uint16_t port, const uint8_t *eth,
                         const uint8_t *ip, const uint8_t *tcp, uint32_t tcp_len);

/* uint32_t pylvs_ip_fragment(struct pylvs_emit *em, uint16_t port,
 *         const uint8_t *eth, const uint8_t *ip, uint32_t ip_len,
 *         uint32_t mtu);
 *
 * RFC 791 fragmentation (kernel ip_do_fragment) of the unfragmented packet
 * at `ip` into IP packets of at most `mtu` bytes, each emitted on `port`
 * with eth's Ethernet header: every fragment but the last carries
 * (mtu - IHL*4) & ~7 payload bytes; same ID; MF and offset set, other flag
 * bits clear; the first keeps the options, the others have every option
 * without the copied flag overwritten by NOOPs (ip_options_fragment), so
 * every header keeps the original IHL; header checksum per fragment.
 * All or nothing: returns the number of fragments emitted, or 0 with
 * nothing emitted when they do not all fit, or when the packet is not
 * fragmentable: DF set, already a fragment, ip_len <= mtu, mtu < 68
 * (RFC 791), or a malformed header. */
uint32_t pylvs_ip_fragment(struct pylvs_emit *em, uint16_t port, const uint8_t *eth,
                           const uint8_t *ip, uint32_t ip_len, uint32_t mtu);

/* What pylvs_icmp_inner finds in an ICMP error: the ICMP type and code, the
 * quoted packet's tuple (host order) and offsets from the outer IP header. */
struct pylvs_icmp_inner {
    uint8_t type, code, proto;
    uint32_t saddr, daddr;
    uint16_t sport, dport;
    uint32_t icmp_off;   /* the ICMP header (outer IHL * 4) */
    uint32_t inner_off;  /* the quoted IP header (icmp_off + 8) */
    uint32_t l4_off;     /* the quoted TCP/UDP header */
};

/* int pylvs_icmp_inner(const uint8_t *ip, uint32_t ip_len,
 *         struct pylvs_icmp_inner *out);
 *
 * 1 (and *out filled) when the packet at `ip` is an ICMP error IPVS
 * translates (ip_vs_in_icmp / ip_vs_out_icmp): type 3, 4 or 11; the outer
 * packet not a fragment; the quoted header version 4 with IHL >= 5 and
 * complete; the quote not a non-first fragment (offset 0, MF allowed); TCP
 * or UDP with at least 8 bytes of its header quoted; and the ICMP checksum
 * over ip[IHL*4 : ip_len] right. 0 otherwise (out undefined): the caller
 * leaves such a packet to the kernel (which drops a bad checksum itself).
 * The quoted packet is one the director sent, so its conn is found under
 * the reversed tuple (proto, daddr, dport, saddr, sport): an OUT-key hit is
 * an error from the real-server side (nat_icmp out=1, conn vaddr:vport), an
 * IN-key hit one from the client side (out=0, conn daddr:dport). */
int pylvs_icmp_inner(const uint8_t *ip, uint32_t ip_len, struct pylvs_icmp_inner *out);

/* int pylvs_nat_icmp(uint8_t *ip, uint32_t ip_len, int out, uint32_t addr,
 *         uint16_t port);
 *
 * Translate, in place, an ICMP error that pylvs_icmp_inner accepted
 * (kernel ip_vs_nat_icmp):
 *   out = 1 (from the real-server side, to the client): outer saddr ->
 *     addr (the VIP); quoted daddr:dport -> addr:port (VIP:vport);
 *   out = 0 (from the client side, to the real server): outer daddr ->
 *     addr (the RIP); quoted saddr:sport -> addr:port (RIP:rport).
 * Then every checksum is right: outer and quoted IP headers recomputed,
 * the quoted TCP/UDP checksum updated for the change (RFC 1624) when its
 * field is within the quote (UDP 0 stays 0; the kernel leaves this field
 * stale), the ICMP checksum recomputed. Returns 1, or 0 (nothing changed)
 * when the packet fails pylvs_icmp_inner's structural checks (the ICMP
 * checksum is not checked again). */
int pylvs_nat_icmp(uint8_t *ip, uint32_t ip_len, int out, uint32_t addr, uint16_t port);

/* Test-hook glue (here and in ip_vs_xmit_tun.c): the emit area from a tuple
 * (buf uint8, off uint32, len uint32, port uint16, n uint32[2] = frames,
 * bytes used), the arrays of Batch's emit area or of
 * pylvs.engine.icmp.Emit. pylvs_emit_open fills *em and holds the buffers
 * (-1 with a Python error set when the tuple is not such arrays);
 * pylvs_emit_done writes n back and releases them. */
struct pylvs_emit_views {
    Py_buffer v[5];
    int nv;
    uint32_t *n;
};
int pylvs_emit_open(PyObject *arrays, struct pylvs_emit *em, struct pylvs_emit_views *ev);
void pylvs_emit_done(struct pylvs_emit *em, struct pylvs_emit_views *ev);

/* Test hooks _icmp_error, _tcp_reset, _ip_fragment, _icmp_inner, _nat_icmp
 * (pylvs/_fast.pyi). */
int pylvs_icmp_register(PyObject *module);

#endif
