/* The engine's C interface inside the _fast extension.
 *
 * engine.c implements the Engine type (see docs/engine.md); other C files of
 * the extension (the AF_PACKET forwarder) call pylvs_engine_frame() on frames
 * that stay where they are (in a receive ring), so the hot loop never builds
 * a Python object per packet. The caller holds the GIL: a new flow may call
 * the Python scheduler.
 */
#ifndef PYLVS_ENGINE_H
#define PYLVS_ENGINE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* Verdicts: as pylvs/engine/tables.py. */
#define PYLVS_V_PASS 0
#define PYLVS_V_TX 1
#define PYLVS_V_DROP 2
#define PYLVS_V_EMIT 3   /* not sent itself: what the engine made of it is in the emit area */

/* Global counter indices: as STAT_NAMES in pylvs/engine/tables.py. */
enum pylvs_stat {
    ST_RX_FRAMES, ST_TX_FRAMES, ST_PASS_NOT_IPV4, ST_PASS_NOT_OURS,
    ST_DROP_TRUNCATED, ST_DROP_BAD_IP, ST_DROP_BAD_L4, ST_DROP_FRAGMENT,
    ST_DROP_NO_CONN, ST_DROP_NO_DEST, ST_DROP_TABLE_FULL, ST_DROP_DEST_GONE,
    ST_DROP_UNRESOLVED, ST_DROP_FWD_METHOD, ST_DROP_CONFLICT,
    ST_CONNS_CREATED, ST_CONNS_EXPIRED, ST_IP_OPTIONS, ST_CSUM_PARTIAL_FIXED,
    ST_GSO_FRAMES, ST_SCHED_ERRORS,
    ST__COUNT
};
#define PYLVS_N_STATS 32

#define PYLVS_VNET_HDR_LEN 10

/* The Engine object; its layout is private to engine.c. */
typedef struct pylvs_engine PylvsEngine;

/* Is `obj` an instance of _fast.Engine? */
int pylvs_engine_check(PyObject *obj);

/* Frames the engine creates (ICMP errors, RSTs, IP fragments): each is a
 * 10-byte all-zero virtio_net_hdr + a complete Ethernet frame at
 * buf + off[i], len[i] bytes (header included), to leave on port[i]. */
struct pylvs_emit {
    uint8_t *buf; uint32_t cap, used;     /* bytes */
    uint32_t n, max;                      /* frames */
    uint32_t *off, *len; uint16_t *port;  /* per frame */
};

/* Room for one frame of `len` bytes (vnet header included) to leave on
 * `port`; NULL (and nothing changed) when buf or the frame slots are full. */
uint8_t *pylvs_emit_reserve(struct pylvs_emit *em, uint32_t len, uint16_t port);

/* Process one frame in place. `frame` points at the virtio_net_hdr, `len`
 * counts it. Returns PYLVS_V_*; for PYLVS_V_TX, *out_port is the egress
 * port. Frames made in answer are appended to `em` (NULL: none are made).
 * Never raises (errors are counted). */
int pylvs_engine_frame(PylvsEngine *e, uint8_t *frame, uint32_t len,
                       uint16_t in_port, double now, uint16_t *out_port,
                       struct pylvs_emit *em);

/* Run the expiry clock hand over up to `budget` conn slots. */
long pylvs_engine_expire(PylvsEngine *e, double now, long budget);

/* Module set-up: each C file adds its types and functions. */
int pylvs_engine_register(PyObject *module);
int pylvs_afpacket_register(PyObject *module);

#endif
