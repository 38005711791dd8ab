/* The engine's C interface inside the _fast extension.
 *
 * The engine (ip_vs.h and the files it lists; see docs/engine.md) implements
 * the Engine type; other C files of the extension (the AF_PACKET forwarder)
 * call pylvs_engine_frame() on frames that stay where they are (in a receive
 * ring), so the hot loop never builds a Python object per packet. The caller
 * holds either the GIL or (forward, without the GIL) the engine's lock taken
 * with pylvs_engine_lock: a new flow calls the Python scheduler, taking the
 * GIL back for it.
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
#define PYLVS_V_EMIT 3

/* Global counter indices: as STAT_NAMES in pylvs/engine/tables.py. */
enum pylvs_stat {
    ST_RX_FRAMES, ST_TX_FRAMES, ST_PASS_NOT_IPV4, ST_PASS_NOT_OURS,
    ST_DROP_TRUNCATED, ST_DROP_BAD_IP, ST_DROP_BAD_L4, ST_DROP_FRAGMENT,
    ST_DROP_NO_CONN, ST_DROP_NO_DEST, ST_DROP_TABLE_FULL, ST_DROP_DEST_GONE,
    ST_DROP_UNRESOLVED, ST_DROP_FWD_METHOD, ST_DROP_CONFLICT,
    ST_CONNS_CREATED, ST_CONNS_EXPIRED, ST_IP_OPTIONS, ST_CSUM_PARTIAL_FIXED,
    ST_GSO_FRAMES, ST_SCHED_ERRORS,
    ST_DROP_BAD_IP_CSUM, ST_DROP_L2_OTHER_HOST, ST_DROP_L2_BCAST, ST_DROP_SOURCE_ROUTE,
    ST_DROP_MARTIAN, ST_DROP_RP_FILTER, ST_DROP_FRAG_NEEDED, ST_DROP_GSO_TOO_BIG,
    ST_TX_FRAGMENTED, ST_ICMP_FORWARDED,
    ST_EMIT_FRAMES, ST_EMIT_OVERFLOW, ST_ICMP_UNREACH_SENT, ST_ICMP_FRAG_NEEDED_SENT,
    ST_RST_SENT, ST_ICMP_RATELIMITED, ST_RST_RATELIMITED, ST_FRAG_OUT, ST_CONNS_EVICTED,
    ST_CONNS_REUSED, ST_DROP_TTL, ST_ICMP_TIME_EXCEEDED_SENT, ST_DROP_NO_ROUTE,
    ST_TX_TUNNELED, ST_TUN_PMTU_LEARNED, ST_DROP_TUN_ICMP, ST_TUN_ICMP_RELAYED,
    ST_DROP_UPCALL_LIMIT, ST_DROP_DEFENSE, ST_CONNS_DROPPED, ST_DROP_RS_NO_CONN,
    ST_DROP_PRESSURE,
    ST_DROP_SYNC_NO_MAC, ST_SYNC_QUEUED, ST_SYNC_QUEUE_FULL, ST_SYNC_INSTALLED,
    ST_SYNC_UPDATED, ST_SYNC_REJECTED, ST_SYNC_NO_DEST, ST_SYNC_STALE, ST_SYNC_TABLE_FULL,
    ST_SYNC_L2_ROUTED,
    ST__COUNT
};
#define PYLVS_N_STATS 64

/* Sysctl indices: as SYSCTL_NAMES in pylvs/engine/tables.py. */
enum pylvs_sysctl {
    SYS_CONN_REUSE_MODE, SYS_EXPIRE_NODEST_CONN, SYS_ICMP_MSGS_PER_SEC, SYS_ICMP_MSGS_BURST,
    SYS_TCP_RST_PER_SEC, SYS_TCP_RST_BURST, SYS_ICMP_RATELIMIT, SYS_UPCALL_SHARE,
    SYS_SLOPPY_TCP, SYS_NAT_ICMP_SEND, SYS_PMTU_DISC, SYS_DROP_ENTRY, SYS_DROP_PACKET,
    SYS_SECURE_TCP, SYS_AMEMTHRESH, SYS_AM_DROPRATE,
    SYS_EXPIRE_QUIESCENT_TEMPLATE, SYS_PRESSURE_CONN_RATE,
    SYS_SYNC_THRESHOLD, SYS_SYNC_PERIOD, SYS_SYNC_REFRESH_PERIOD, SYS_SYNC_RETRIES,
    SYS_SYNC_QLEN_MAX, SYS_SYNC_PERSIST_MODE, SYS_SYNC_VERSION,
    SYS__COUNT
};

#define PYLVS_VNET_HDR_LEN 10

/* The Engine object; its layout is private to the engine (ip_vs.h). */
typedef struct pylvs_engine PylvsEngine;

/* Frames the engine makes (ICMP errors, RSTs, IP fragments) go to an emit
 * area (ip_vs_icmp.h); NULL: the caller has none and nothing is made. */
struct pylvs_emit;

/* Is `obj` an instance of _fast.Engine? */
int pylvs_engine_check(PyObject *obj);

/* Process one frame in place. `frame` points at the virtio_net_hdr, `len`
 * counts it. Returns PYLVS_V_*; for PYLVS_V_TX, *out_port is the egress
 * port. Never raises (errors are counted). */
int pylvs_engine_frame(PylvsEngine *e, uint8_t *frame, uint32_t len,
                       uint16_t in_port, double now, uint16_t *out_port,
                       struct pylvs_emit *em);

/* What pylvs_engine_run leaves in the emit area, for a caller that sends
 * it while the run goes on: the run stops before a frame (not the first)
 * when less than `bytes` or `frames` are left, and emit_end[i] gets em->n
 * after frame i, so that frame i's own output is emit_end[i - 1] (0 for the
 * first) up to emit_end[i]. */
struct pylvs_emit_room {
    uint32_t bytes, frames;
    uint32_t *emit_end;
};

/* Process up to PYLVS_ENGINE_RUN_MAX frames in place, as calls of
 * pylvs_engine_frame one by one would, in a pipeline that overlaps each
 * frame's conn lookup with work on the others (ip_vs_core.c). frames[i]
 * points at a virtio_net_hdr, lens[i] counts it, ports[i] is its in port;
 * verdicts[i] gets its PYLVS_V_*, outs[i] its egress port when that is
 * PYLVS_V_TX. `room`: see above, or NULL (the run never stops early).
 * Returns the number of frames processed, from the first. */
#define PYLVS_ENGINE_RUN_MAX 256
int pylvs_engine_run(PylvsEngine *e, uint8_t *const *frames, const uint32_t *lens,
                     const uint16_t *ports, uint8_t *verdicts, uint16_t *outs, int count,
                     double now, struct pylvs_emit *em, const struct pylvs_emit_room *room);

/* Workers: forward() lets the GIL go and holds the engine's lock for its
 * batch (every Python method takes the same lock). `nogil` is the caller's
 * saved thread state: the scheduler upcall takes the GIL with it and lets
 * it go again. unlock returns the (same) saved state. Called without the
 * GIL. */
void pylvs_engine_lock(PylvsEngine *e, PyThreadState *nogil);
PyThreadState *pylvs_engine_unlock(PylvsEngine *e);
/* Is this thread inside the engine's own scheduler upcall (GIL held)? */
int pylvs_engine_reentered(PylvsEngine *e);

/* The caller's receive ring is backed up (1) or not (0): while it is, new
 * flows may spend only the `upcall_share` sysctl's percent of the time in
 * the scheduler upcall (docs/engine.md, "Upcall limit"). Set by each
 * backend's frame loop as often as it looks at its ring. */
void pylvs_engine_set_pressure(PylvsEngine *e, int on);

/* Run the expiry clock hand over up to `budget` conn slots. */
long pylvs_engine_expire(PylvsEngine *e, double now, long budget);

/* Module set-up: each C file adds its types and functions. */
int pylvs_engine_register(PyObject *module);
int pylvs_afpacket_register(PyObject *module);
int pylvs_tap_register(PyObject *module);
int pylvs_xdp_register(PyObject *module);  /* xdp.c: AF_XDP */

#endif
