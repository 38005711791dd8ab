/* Schedulers on the miss path and the overload flag (ip_vs_sched.h). Each
 * rule is the kernel's (net/netfilter/ipvs/ip_vs_<name>.c) and gives what
 * the Python scheduler of the same name (pylvs/sched/<name>.py, the
 * reference) gives for the same list, counts and flags; tests/test_sched_c.py
 * compares the two row by row.
 */
#include "ip_vs.h"

/* --- the overload flag ---------------------------------------------------- */

static inline int64_t total_conns(const PylvsEngine *e, uint32_t d)
{
    return (int64_t)__atomic_load_n(&e->dest_conns[d][C_ACTIVE], __ATOMIC_RELAXED) +
           __atomic_load_n(&e->dest_conns[d][C_INACTIVE], __ATOMIC_RELAXED);
}

void dest_overload_bind(PylvsEngine *e, uint32_t d)
{
    if (d >= e->nthresh || d >= e->max_dests)
        return;
    uint32_t u = e->thresh[d].u_threshold;
    if (u != 0 && total_conns(e, d) >= u)
        __atomic_fetch_or(&e->dest_flags[d], DEST_F_OVERLOAD, __ATOMIC_RELAXED);
}

void dest_overload_unbind(PylvsEngine *e, uint32_t d)
{
    if (d >= e->max_dests)
        return;
    int64_t u = 0, l = 0;
    if (d < e->nthresh) {
        u = e->thresh[d].u_threshold;
        l = e->thresh[d].l_threshold;
    }
    /* -y when set; else below 3/4 of -x; no threshold: never overloaded. */
    int64_t n = total_conns(e, d);
    if (l != 0 ? n < l : u != 0 ? n * 4 < u * 3 : 1)
        __atomic_fetch_and(&e->dest_flags[d], (uint8_t)~DEST_F_OVERLOAD, __ATOMIC_RELAXED);
}

/* --- reading a dest ------------------------------------------------------- */

static inline int overloaded(const PylvsEngine *e, uint32_t slot)
{
    return __atomic_load_n(&e->dest_flags[slot], __ATOMIC_RELAXED) & DEST_F_OVERLOAD;
}

static inline int64_t active(const PylvsEngine *e, uint32_t slot)
{
    return __atomic_load_n(&e->dest_conns[slot][C_ACTIVE], __ATOMIC_RELAXED);
}

/* ip_vs_dest_conn_overhead: an active conn weighs 256 inactive ones. */
static inline int64_t conn_overhead(const PylvsEngine *e, uint32_t slot)
{
    return active(e, slot) * 256 +
           __atomic_load_n(&e->dest_conns[slot][C_INACTIVE], __ATOMIC_RELAXED);
}

/* Weight > 0 and not overloaded: what every scheduler may pick. */
static inline int available(const PylvsEngine *e, const sched_dest_row *d)
{
    return d->weight > 0 && !overloaded(e, d->slot);
}

/* --- the stateless ones --------------------------------------------------- */

/* lc, wlc, sed, nq: the least cost / weight, by cross-multiplying
 * (ip_vs_wlc.c: loh * w > doh * lw), the first in list order winning a
 * tie; lc compares costs alone (ip_vs_lc.c); nq takes an idle dest (no
 * active conn) at once (ip_vs_nq.c). */
static long least_cost(const PylvsEngine *e, const sched_dest_row *l, uint32_t n, int kind)
{
    const sched_dest_row *least = NULL;
    int64_t loh = 0;
    for (uint32_t i = 0; i < n; i++) {
        const sched_dest_row *d = &l[i];
        if (!available(e, d))
            continue;
        int64_t doh = kind == SK_LC || kind == SK_WLC ? conn_overhead(e, d->slot)
                                                            : active(e, d->slot) + 1;
        if (kind == SK_NQ && doh == 1)
            return d->slot;
        if (least == NULL ||
            (kind == SK_LC ? doh < loh : loh * d->weight > doh * least->weight)) {
            least = d;
            loh = doh;
        }
    }
    return least ? (long)least->slot : -1;
}

/* fo: the highest weight (ip_vs_fo.c); ovf: the same among dests whose
 * active conns do not exceed their weight (ip_vs_ovf.c). First wins ties. */
static long heaviest(const PylvsEngine *e, const sched_dest_row *l, uint32_t n, int kind)
{
    const sched_dest_row *best = NULL;
    for (uint32_t i = 0; i < n; i++) {
        const sched_dest_row *d = &l[i];
        if (!available(e, d) || (kind == SK_OVF && active(e, d->slot) > d->weight))
            continue;
        if (best == NULL || d->weight > best->weight)
            best = d;
    }
    return best ? (long)best->slot : -1;
}

/* --- the stateful ones, under their row's lock ----------------------------- */

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Held for one pick or one update (a walk of the service's list), never
 * across a call that may block or take the GIL. */
static inline void row_lock(int32_t *st)
{
    while (__atomic_exchange_n(&st[SW_LOCK], 1, __ATOMIC_ACQUIRE))
        while (__atomic_load_n(&st[SW_LOCK], __ATOMIC_RELAXED))
            cpu_relax();
}

static inline void row_unlock(int32_t *st)
{
    __atomic_store_n(&st[SW_LOCK], 0, __ATOMIC_RELEASE);
}

/* rr (ip_vs_rr.c): the next available dest after the last pick, cyclically,
 * the last pick itself tried last. */
static long rr_pick(const PylvsEngine *e, const sched_dest_row *l, uint32_t n, int32_t *st)
{
    int64_t pos = st[SW_POS];
    /* Only while a new list is on its way to this engine. */
    if (pos >= (int64_t)n)
        pos = (int64_t)n - 1;
    for (uint32_t step = 1; step <= n; step++) {
        uint32_t i = (uint32_t)((pos + step) % n);
        if (available(e, &l[i])) {
            st[SW_POS] = (int32_t)i;
            st[SW_LAST] = (int32_t)l[i].slot;
            return l[i].slot;
        }
    }
    return -1;
}

/* wrr (ip_vs_wrr.c): from the last pick on, the next available dest with
 * weight >= cw; at the list's end cw steps down by di (back to mw below 1),
 * stopping once every dest was tried against weight >= 1. */
static long wrr_pick(const PylvsEngine *e, const sched_dest_row *l, uint32_t n, int32_t *st)
{
    int64_t mw = st[SW_MW], di = st[SW_DI] > 0 ? st[SW_DI] : 1, cw = st[SW_CW];
    int64_t last = st[SW_POS], stop = -2, pos;
    long found = -1;
    if (mw <= 0)
        return -1;
    if (last >= (int64_t)n)
        last = -1; /* a list change not yet here: from the head */
    pos = last;
    int last_pass = 0, restarted = 0;
    for (;;) {
        int64_t i;
        for (i = pos + 1; i < (int64_t)n; i++) {
            if (!overloaded(e, l[i].slot) && l[i].weight >= cw) {
                found = l[i].slot;
                break;
            }
            if (i == stop)
                break;
        }
        if (i < (int64_t)n) {
            st[SW_POS] = (int32_t)i;
            break;
        }
        pos = -1;
        cw -= di;
        if (cw <= 0) {
            cw = mw;
            if (last_pass || last == -1) {
                st[SW_POS] = -1;
                break;
            }
            restarted = 1;
        }
        last_pass = cw <= di;
        if (last_pass && restarted && last != -1)
            stop = last;
    }
    st[SW_CW] = (int32_t)cw;
    return found;
}

/* --- the hash ones: control builds the table, the engine hashes ---------- */

/* include/linux/hash.h hash_32 (the generic one, as on x86-64). */
static inline uint32_t hash_32(uint32_t val, unsigned bits)
{
    return (uint32_t)(val * 0x61C88647u) >> (32 - bits);
}

/* lib/siphash.c hsiphash() of one u32 on a 64-bit kernel: SipHash-1-3 of
 * its 4 bytes in memory order, the low 32 bits; ip_vs_mh.c's key 1. */
static inline uint32_t mh_hash(uint32_t v)
{
    uint8_t b[4] = {(uint8_t)v, (uint8_t)(v >> 8), (uint8_t)(v >> 16), (uint8_t)(v >> 24)};
    return (uint32_t)pylvs_siphash(2654435761u, 2654435761u, b, 4, 1, 3);
}

/* The entry's dest if available; else with a fallback walk (`probe(i)`,
 * the entries ip_vs_sh/mh_get_fallback try) the first available one, an
 * empty entry ending the walk; -1 for none. */
static long table_pick(const PylvsEngine *e, const sched_svc_row *s, const int32_t *tab,
                       uint32_t entry, uint32_t tries, uint32_t caddr, uint32_t port)
{
    const sched_dest_row *l = e->sched_dest + s->first;
    int32_t i = tab[entry];
    if (i < 0 || (uint32_t)i >= s->count)
        return -1;
    if (available(e, &l[i]))
        return l[i].slot;
    for (uint32_t off = 0; off < tries; off++) {
        uint32_t at = s->kind == SK_SH
                          ? (off + 2 * entry) & (SH_TAB_SIZE - 1)
                          : mh_hash((off + entry) % MH_TAB_SIZE + port + caddr) % MH_TAB_SIZE;
        i = tab[at];
        if (i < 0 || (uint32_t)i >= s->count)
            return -1;
        if (available(e, &l[i]))
            return l[i].slot;
    }
    return -1;
}

/* sh (ip_vs_sh.c): bucket hash_32(caddr + port, 8); dh (ip_vs_dh.c):
 * hash_32(daddr, 8); mh (ip_vs_mh.c): hsiphash(caddr + port) mod 4093.
 * port = the client's with sh-port / mh-port, else 0. */
static long hash_pick(const PylvsEngine *e, int svc, const sched_svc_row *s, uint32_t caddr,
                      uint16_t cport)
{
    const int32_t *tab = e->sched_table + s->table;
    uint32_t port = s->flags & SVC_F_SCHED2 ? cport : 0;
    if (s->kind == SK_DH) {
        if ((uint32_t)svc >= e->nservices)
            return -1;
        return table_pick(e, s, tab, hash_32(e->services[svc].vaddr, SH_TAB_BITS), 0, 0, 0);
    }
    int fallback = (s->flags & SVC_F_SCHED1) != 0;
    if (s->kind == SK_SH)
        return table_pick(e, s, tab, hash_32(caddr + port, SH_TAB_BITS),
                          fallback ? SH_TAB_SIZE : 0, caddr, port);
    return table_pick(e, s, tab, mh_hash(caddr + port) % MH_TAB_SIZE,
                      fallback ? MH_TAB_SIZE : 0, caddr, port);
}

/* --- the choice ------------------------------------------------------------ */

int sched_needs_upcall(const PylvsEngine *e, int svc)
{
    return (uint32_t)svc >= e->nsched_svc || e->sched_svc[svc].kind == SK_UPCALL;
}

long sched_pick(PylvsEngine *e, int svc, uint32_t caddr, uint16_t cport)
{
    if (sched_needs_upcall(e, svc))
        return SCHED_ASK_PYTHON;
    const sched_svc_row *s = &e->sched_svc[svc];
    const sched_dest_row *l = e->sched_dest + s->first;
    uint32_t n = s->count;
    switch (s->kind) {
    case SK_RR:
    case SK_WRR: {
        if (n == 0)
            return -1;
        int32_t *st = e->sched_state[svc];
        row_lock(st);
        long d = s->kind == SK_RR ? rr_pick(e, l, n, st) : wrr_pick(e, l, n, st);
        row_unlock(st);
        return d;
    }
    case SK_FO:
    case SK_OVF:
        return heaviest(e, l, n, s->kind);
    case SK_SH:
    case SK_DH:
    case SK_MH:
        return hash_pick(e, svc, s, caddr, cport);
    default:
        return least_cost(e, l, n, s->kind);
    }
}

static uint32_t table_size(int kind)
{
    return kind == SK_MH ? MH_TAB_SIZE : kind == SK_SH || kind == SK_DH ? SH_TAB_SIZE : 0;
}

int sched_check_tables(const sched_svc_row *svcs, uint32_t nsvcs, const sched_dest_row *dests,
                       uint32_t ndests, const int32_t *table, uint32_t ntable,
                       uint32_t max_dests)
{
    for (uint32_t s = 0; s < nsvcs; s++) {
        const sched_svc_row *r = &svcs[s];
        if (r->kind >= SK_COUNT) {
            PyErr_Format(PyExc_ValueError, "sched_svcs[%u]: unknown scheduler kind %u", s,
                         r->kind);
            return -1;
        }
        if (r->kind != SK_UPCALL &&
            ((uint64_t)r->first + r->count > ndests)) {
            PyErr_Format(PyExc_ValueError, "sched_svcs[%u]: dests %u..%u beyond the %u given",
                         s, r->first, r->first + r->count, ndests);
            return -1;
        }
        if ((uint64_t)r->table + table_size(r->kind) > ntable) {
            PyErr_Format(PyExc_ValueError, "sched_svcs[%u]: its table at %u is beyond the "
                         "%u entries given", s, r->table, ntable);
            return -1;
        }
    }
    for (uint32_t i = 0; i < ndests; i++) {
        if (dests[i].slot >= max_dests) {
            PyErr_Format(PyExc_ValueError, "sched_dests[%u]: slot %u beyond the counters' %u",
                         i, dests[i].slot, max_dests);
            return -1;
        }
    }
    return 0;
}

/* --- control's side: a service's dests changed ----------------------------- */

static int64_t gcd64(int64_t a, int64_t b)
{
    while (b != 0) {
        int64_t t = a % b;
        a = b;
        b = t;
    }
    return a;
}

/* What the kernel's rr del_dest and wrr dest_changed do to the state when
 * the list becomes `l` (`reset`: a scheduler freshly bound, as init_service). */
static void state_update(int32_t *st, int kind, const sched_dest_row *l, uint32_t n, int reset)
{
    if (kind == SK_RR) {
        if (reset) {
            st[SW_POS] = -1;
            st[SW_LAST] = -1;
        }
        /* The last pick still listed keeps the turn; else the mark moves to
         * the entry before it. */
        for (uint32_t i = 0; i < n; i++) {
            if ((int64_t)l[i].slot == st[SW_LAST]) {
                st[SW_POS] = (int32_t)i;
                return;
            }
        }
        int64_t pos = st[SW_POS] >= 0 ? st[SW_POS] - 1 : -1;
        if (pos > (int64_t)n - 1)
            pos = (int64_t)n - 1;
        st[SW_POS] = (int32_t)pos;
        st[SW_LAST] = pos >= 0 ? (int32_t)l[pos].slot : -1;
    } else if (kind == SK_WRR) {
        if (reset) {
            st[SW_CW] = 0;
            st[SW_MW] = 0;
            st[SW_DI] = 1;
        }
        int64_t g = 0, mw = 0;
        for (uint32_t i = 0; i < n; i++) {
            if (l[i].weight > 0)
                g = g ? gcd64(l[i].weight, g) : l[i].weight;
            if (l[i].weight > mw)
                mw = l[i].weight;
        }
        int64_t di = g ? g : 1, cw = st[SW_CW];
        mw -= di - 1;
        if (cw > mw || cw == 0)
            cw = mw;
        else if (di > 1)
            cw = (cw / di) * di + 1;
        st[SW_POS] = -1;
        st[SW_DI] = (int32_t)di;
        st[SW_MW] = (int32_t)mw;
        st[SW_CW] = (int32_t)cw;
    }
}

static PyObject *fast_sched_update(PyObject *mod, PyObject *args)
{
    static const char *const fields[] = {"slot", "weight", NULL};
    static const Py_ssize_t offsets[] = {offsetof(sched_dest_row, slot),
                                         offsetof(sched_dest_row, weight)};
    static const Py_ssize_t shape[2] = {-1, SCHED_STATE_WORDS};
    (void)mod;
    PyObject *state, *dests;
    int svc, kind, reset;
    if (!PyArg_ParseTuple(args, "OiiOp:sched_update", &state, &svc, &kind, &dests, &reset))
        return NULL;
    Py_buffer sv, dv;
    if (get_array(state, "state", 'i', 4, "int32", 2, shape, 1, &sv) < 0)
        return NULL;
    if (get_table(dests, "dests", "SCHED_DEST_DTYPE", fields, offsets, sizeof(sched_dest_row),
                  UINT32_MAX, &dv) < 0) {
        PyBuffer_Release(&sv);
        return NULL;
    }
    PyObject *r = NULL;
    if (svc < 0 || svc >= sv.shape[0])
        PyErr_Format(PyExc_IndexError, "service slot %d is not a row of state", svc);
    else if (kind < 0 || kind >= SK_COUNT)
        PyErr_Format(PyExc_ValueError, "unknown scheduler kind %d", kind);
    else {
        int32_t *st = (int32_t *)sv.buf + (Py_ssize_t)svc * SCHED_STATE_WORDS;
        row_lock(st);
        state_update(st, kind, dv.buf, (uint32_t)dv.shape[0], reset);
        row_unlock(st);
        r = Py_None;
        Py_INCREF(r);
    }
    PyBuffer_Release(&sv);
    PyBuffer_Release(&dv);
    return r;
}

static PyMethodDef sched_functions[] = {
    {"sched_update", fast_sched_update, METH_VARARGS,
     "sched_update(state, svc, kind, dests, reset): the rr/wrr state row of service svc in\n"
     "counters.sched_state after its dest list became `dests` (SCHED_DEST_DTYPE, the\n"
     "scheduler's order), as the kernel's rr del_dest / wrr dest_changed; reset: a\n"
     "scheduler freshly bound. Other kinds keep no state. Takes the row's lock."},
    {NULL},
};

int pylvs_sched_register(PyObject *module)
{
    return PyModule_AddFunctions(module, sched_functions);
}
