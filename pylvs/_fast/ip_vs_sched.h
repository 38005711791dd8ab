/* Schedulers on the engine's miss path, and the overload flag (the
 * kernel's ip_vs_rr.c ... ip_vs_ovf.c, ip_vs_bind_dest / ip_vs_unbind_dest;
 * docs/engine.md "Schedulers in C").
 *
 * Control publishes, per service, the scheduler kind, its -b flags and its
 * dests (slot, weight) in the order the Python scheduler sees them
 * (tables.SCHED_SVC_DTYPE, SCHED_DEST_DTYPE); the engine only indexes
 * them. What a stateful scheduler remembers between two new conns (the rr
 * position, the wrr current weight) lives in counters.sched_state, one row
 * per service shared by every worker's engine and changed under the row's
 * lock word, so that two workers draw one sequence as the kernel's single
 * svc->sched_data does.
 */
#ifndef PYLVS_IP_VS_SCHED_H
#define PYLVS_IP_VS_SCHED_H

#include "engine.h"

#include <stdint.h>

/* tables.SCHED_KINDS (SK_: SCHED_RR is POSIX's); SK_UPCALL: Python decides. */
enum sched_kind {
    SK_UPCALL, SK_RR, SK_WRR, SK_LC, SK_WLC, SK_SED, SK_NQ, SK_FO,
    SK_OVF, SK_SH, SK_DH, SK_MH,
    SK_COUNT
};

/* The service's -b bits (IP_VS_SVC_F_SCHED1, _SCHED2): sh/mh-fallback,
 * sh/mh-port. */
#define SVC_F_SCHED1 0x08
#define SVC_F_SCHED2 0x10

/* The hash schedulers' table sizes (pylvs/sched/sh.py, dh.py, mh.py). */
#define SH_TAB_BITS 8
#define SH_TAB_SIZE (1u << SH_TAB_BITS)
#define MH_TAB_SIZE 4093u

/* tables.DEST_F_OVERLOAD, a bit of counters.dest_flags. */
#define DEST_F_OVERLOAD 1

/* tables.SCHED_STATE_WORDS, and the words of a row: 0 is the lock. */
#define SCHED_STATE_WORDS 8
#define SW_LOCK 0
#define SW_POS 1  /* rr: index of the last pick, -1 the list head; wrr: cl */
#define SW_LAST 2 /* rr: the last pick's dest slot, -1 none */
#define SW_CW 2   /* wrr: current weight */
#define SW_MW 3   /* wrr: max weight less (gcd - 1) */
#define SW_DI 4   /* wrr: gcd of the positive weights */

/* tables.SCHED_SVC_DTYPE, SCHED_DEST_DTYPE, DEST_THRESH_DTYPE (align=True) */
typedef struct {
    uint8_t kind;
    uint8_t flags;
    uint16_t pad;
    uint32_t first;
    uint32_t count;
    uint32_t table; /* sh, dh, mh: their table's first entry in sched_table */
} sched_svc_row;

typedef struct {
    uint32_t slot;
    int32_t weight;
} sched_dest_row;

typedef struct {
    uint32_t u_threshold;
    uint32_t l_threshold;
} dest_thresh_row;

_Static_assert(sizeof(sched_svc_row) == 16, "SCHED_SVC_DTYPE is 16 bytes");
_Static_assert(sizeof(sched_dest_row) == 8, "SCHED_DEST_DTYPE is 8 bytes");
_Static_assert(sizeof(dest_thresh_row) == 8, "DEST_THRESH_DTYPE is 8 bytes");

/* What sched_pick answers when the service has no C scheduler. */
#define SCHED_ASK_PYTHON (-3)

/* The dest slot the service's C scheduler picks, -1 for none, or
 * SCHED_ASK_PYTHON. Never calls Python. */
long sched_pick(PylvsEngine *e, int svc, uint32_t caddr, uint16_t cport);

/* Does a new conn of this service need the Python scheduler? */
int sched_needs_upcall(const PylvsEngine *e, int svc);

/* A conn was just bound to / unbound from dest slot `d` (its count already
 * changed): set or clear DEST_F_OVERLOAD by its thresholds, as the kernel's
 * ip_vs_bind_dest / ip_vs_unbind_dest. */
void dest_overload_bind(PylvsEngine *e, uint32_t d);
void dest_overload_unbind(PylvsEngine *e, uint32_t d);

/* The published tables were checked (engine_type.c set_sched): rows in
 * range, kinds known. */
int sched_check_tables(const sched_svc_row *svcs, uint32_t nsvcs, const sched_dest_row *dests,
                       uint32_t ndests, const int32_t *table, uint32_t ntable,
                       uint32_t max_dests);

/* _fast.sched_update(state, svc, kind, dests, reset): module function. */
int pylvs_sched_register(PyObject *module);

/* engine_type.c's checked buffer getters, for the module function. */
int get_array(PyObject *obj, const char *what, char kind, Py_ssize_t itemsize,
              const char *tname, int ndim, const Py_ssize_t *shape, int writable,
              Py_buffer *out);
int get_table(PyObject *arr, const char *what, const char *dtype_name,
              const char *const *fields, const Py_ssize_t *offsets, Py_ssize_t size,
              uint32_t max_rows, Py_buffer *out);

#endif
