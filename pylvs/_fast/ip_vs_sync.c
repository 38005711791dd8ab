/* Connection sync, the engine's side (the kernel's ip_vs_sync.c; docs/engine.md,
 * "Sync"): the master's rule for when a conn is sent and its queue of
 * records, the backup's install of records (ip_vs_proc_conn), and the bulk
 * walk of the table. Records are pylvs.engine.sync.SYNC_DTYPE (struct
 * sync_rec), host order; pylvs.sync puts them on the wire.
 */
#include "ip_vs.h"

#include <math.h>

/* The kernel's IP_VS_CONN_F_* bits (include/uapi/linux/ip_vs.h). */
#define IPVS_F_FWD_MASK 0x0007
#define IPVS_F_SYNC 0x0020
#define IPVS_F_NOOUTPUT 0x0080
#define IPVS_F_INACTIVE 0x0100
#define IPVS_F_SEQ_MASK 0x0600
#define IPVS_F_NO_CPORT 0x0800
#define IPVS_F_TEMPLATE 0x1000
#define IPVS_F_BACKUP_MASK                                                                     \
    (IPVS_F_FWD_MASK | IPVS_F_NOOUTPUT | IPVS_F_INACTIVE | IPVS_F_SEQ_MASK | IPVS_F_NO_CPORT | \
     IPVS_F_TEMPLATE)
#define IPVS_UDP_S_NORMAL 0
#define CTPL_S_LAST 2
/* The TCP states in which a conn is sent (ip_vs_sync_conn_needed). */
#define SYNC_TCP_STATES                                                                      \
    ((1u << S_ESTABLISHED) | (1u << S_FIN_WAIT) | (1u << S_CLOSE) | (1u << S_CLOSE_WAIT) | \
     (1u << S_TIME_WAIT))
/* A template's timeout when its record has none (ip_vs_proc_conn: 3 min). */
#define SYNC_TPL_DEFAULT_TIMEOUT 180
#define SYNC_QLEN_LIMIT (1u << 24)
#define NO_PORT16 0xffff /* tables.NO_PORT: a synced conn's port until its client's frame */

static double conn_timeout(const PylvsEngine *e, const struct conn *c)
{
    return (c->flags & CONN_F_TEMPLATE) ? (double)c->tpl_timeout : e->timeouts[c->state];
}

/* ip_vs_sync_conn_needed: is the conn (or template) to be sent now, with
 * `pkts` its client packets (a template: the sync calls of its conns)?
 * Updates the sync memory when it is. */
static int sync_needed(PylvsEngine *e, struct conn *c, uint32_t pkts, double now)
{
    int tpl = (c->flags & CONN_F_TEMPLATE) != 0;
    double timeout = conn_timeout(e, c);
    uint16_t orig = c->sync_end, n = sync_sec16(now + timeout);
    unsigned retries = 0;
    const int64_t *sys = e->sysctl;
    if (tpl) {
        /* templates go with the conns they control */
    } else if (sys[SYS_SYNC_PERSIST_MODE] && c->control != 0) {
        return 0; /* in_persistence: the template alone stands for them */
    } else if (c->proto == PROTO_TCP) {
        if (!((1u << c->state) & SYNC_TCP_STATES))
            return 0;
        int force = c->state != (c->sync_old & 0x0f);
        if (force && c->state != S_ESTABLISHED)
            goto set;
    }
    int64_t refresh = sys[SYS_SYNC_REFRESH_PERIOD];
    if (refresh > 0) {
        /* Not resent while its expiry moved less than the refresh period
         * (and half its timeout, at least 10 s) since it was last sent;
         * unless sync_retries allow a resend, refresh/8 after it (the
         * kernel shifts jiffies: an eighth of the period, not rounded to
         * whole seconds). */
        int diff = (int16_t)(uint16_t)(n - orig);
        double min_diff = timeout / 2 > 10.0 ? timeout / 2 : 10.0;
        double lim = (double)refresh < min_diff ? (double)refresh : min_diff;
        if (fabs((double)diff) < lim) {
            unsigned r = (c->sync_old >> 4) & 3;
            if ((int64_t)r >= sys[SYS_SYNC_RETRIES])
                return 0;
            if ((int16_t)(uint16_t)(orig - sync_sec16(now + timeout - (double)refresh / 8.0)) > 0)
                return 0;
            retries = r + 1;
        }
    }
    int64_t period = sys[SYS_SYNC_PERIOD];
    if (period > 0) {
        if (!tpl && (int64_t)(pkts % (uint64_t)period) != sys[SYS_SYNC_THRESHOLD])
            return 0;
    } else if (refresh <= 0 && (int64_t)pkts != sys[SYS_SYNC_THRESHOLD]) {
        return 0;
    }
set:
    c->sync_old = (uint8_t)((c->state & 0x0f) | retries << 4);
    c->sync_end = n;
    return 1;
}

/* The record of a conn or template (ip_vs_sync_conn's v1 fill). */
static void sync_fill(const PylvsEngine *e, const struct conn *c, struct sync_rec *r)
{
    int tpl = (c->flags & CONN_F_TEMPLATE) != 0;
    memset(r, 0, sizeof(*r));
    r->proto = (uint8_t)(c->proto & ~TPL_PROTO);
    /* UDP's one state is the kernel's IP_VS_UDP_S_NORMAL. */
    r->state = tpl || c->proto == PROTO_TCP ? c->state : IPVS_UDP_S_NORMAL;
    uint32_t f = c->fwd & IPVS_F_FWD_MASK;
    if (c->fwd != FWD_MASQ)
        f |= IPVS_F_NOOUTPUT;
    /* ip_vs_bind_dest: every conn starts INACTIVE, set_tcp_state clears it
     * while active; a template keeps it. */
    if (tpl || !state_active(c->state))
        f |= IPVS_F_INACTIVE;
    if (tpl)
        f |= IPVS_F_TEMPLATE;
    if (c->flags & CONN_F_SYNCED)
        f |= IPVS_F_SYNC;
    r->flags = f;
    r->caddr = c->caddr;
    r->cport = c->cport;
    r->vaddr = c->vaddr;
    r->vport = c->vport;
    r->daddr = c->daddr;
    r->dport = c->dport;
    r->timeout = (uint32_t)conn_timeout(e, c);
}

static void sync_queue(PylvsEngine *e, const struct conn *c)
{
    if (c->flags & CONN_F_UNHASHED)
        return; /* an invalidated template: nothing a backup could use */
    int64_t max = e->sysctl[SYS_SYNC_QLEN_MAX];
    if (max > (int64_t)e->sync_cap)
        max = e->sync_cap;
    if ((int64_t)e->sync_len >= max) {
        e->stats[ST_SYNC_QUEUE_FULL]++;
        return;
    }
    uint32_t i = (uint32_t)(((uint64_t)e->sync_head + e->sync_len) % e->sync_cap);
    sync_fill(e, c, &e->sync_q[i]);
    e->sync_len++;
    e->stats[ST_SYNC_QUEUED]++;
}

void sync_conn(PylvsEngine *e, struct conn *c, int ops, double now)
{
    /* ip_vs_sync_conn: a one-packet conn is never sent, its template is. */
    if (!ops && sync_needed(e, c, c->in_pkts, now))
        sync_queue(e, c);
    if (c->control != 0) {
        struct conn *t = &e->conns[c->control - 1];
        if (sync_needed(e, t, ++t->in_pkts, now))
            sync_queue(e, t);
    }
}

void sync_learn_l2(struct conn *c, const uint8_t *eth, uint16_t in_port)
{
    memcpy(c->cmac, eth + 6, 6);
    memcpy(c->lmac, eth, 6);
    c->in_port = in_port;
    c->flags &= (uint8_t)~CONN_F_NO_L2;
}

int sync_route_l2(PylvsEngine *e, struct conn *c)
{
    const route_row *r = pylvs_route(&e->net, c->caddr);
    if (r == NULL || !(r->flags & ROUTE_F_MAC))
        return 0;
    const port_row *p = pylvs_port(&e->net, r->port);
    if (p == NULL || (p->flags & PORT_F_LOCAL))
        return 0;
    memcpy(c->cmac, r->mac, 6);
    memcpy(c->lmac, p->mac, 6);
    c->in_port = r->port;
    c->flags &= (uint8_t)~CONN_F_NO_L2;
    e->stats[ST_SYNC_L2_ROUTED]++;
    return 1;
}

void sync_free(PylvsEngine *e)
{
    PyMem_RawFree(e->sync_q);
    e->sync_q = NULL;
    e->sync_cap = e->sync_head = e->sync_len = 0;
}

PyObject *pylvs_sync_set_master(PylvsEngine *e, PyObject *arg)
{
    int on = PyObject_IsTrue(arg);
    if (on < 0)
        return NULL;
    if (!on) {
        sync_free(e);
        Py_RETURN_NONE;
    }
    if (e->sync_q != NULL)
        Py_RETURN_NONE;
    int64_t cap = e->sysctl[SYS_SYNC_QLEN_MAX];
    cap = cap < 1 ? 1 : cap > SYNC_QLEN_LIMIT ? SYNC_QLEN_LIMIT : cap;
    e->sync_q = PyMem_RawMalloc((size_t)cap * sizeof(struct sync_rec));
    if (e->sync_q == NULL)
        return PyErr_NoMemory();
    e->sync_cap = (uint32_t)cap;
    e->sync_head = e->sync_len = 0;
    Py_RETURN_NONE;
}

static const char *const sync_fields[] = {"proto", "state", "flags", "caddr", "cport", "vaddr",
                                          "vport", "daddr", "dport", "fwmark", "timeout", NULL};
static const Py_ssize_t sync_offsets[] = {
    offsetof(struct sync_rec, proto),  offsetof(struct sync_rec, state),
    offsetof(struct sync_rec, flags),  offsetof(struct sync_rec, caddr),
    offsetof(struct sync_rec, cport),  offsetof(struct sync_rec, vaddr),
    offsetof(struct sync_rec, vport),  offsetof(struct sync_rec, daddr),
    offsetof(struct sync_rec, dport),  offsetof(struct sync_rec, fwmark),
    offsetof(struct sync_rec, timeout)};

static int get_records(PyObject *arr, const char *what, int writable, Py_buffer *v)
{
    if (get_table(arr, what, "SYNC_DTYPE", sync_fields, sync_offsets, sizeof(struct sync_rec),
                  UINT32_MAX, v) < 0)
        return -1;
    if (writable && v->readonly) {
        PyErr_Format(PyExc_ValueError, "%s must be writable", what);
        PyBuffer_Release(v);
        return -1;
    }
    return 0;
}

PyObject *pylvs_sync_drain(PylvsEngine *e, PyObject *arg)
{
    Py_buffer v;
    if (get_records(arg, "out", 1, &v) < 0)
        return NULL;
    struct sync_rec *out = v.buf;
    uint32_t n = (uint64_t)v.shape[0] < e->sync_len ? (uint32_t)v.shape[0] : e->sync_len;
    for (uint32_t k = 0; k < n; k++) {
        out[k] = e->sync_q[e->sync_head];
        if (++e->sync_head == e->sync_cap)
            e->sync_head = 0;
    }
    e->sync_len -= n;
    PyBuffer_Release(&v);
    return PyLong_FromUnsignedLong(n);
}

/* Whole seconds a conn expiring at `expires` has left at `now`, rounded
 * up, at least 1 (0 in a record means "the state's timeout") and at most
 * `whole`. */
static uint32_t sync_left(double expires, double now, uint32_t whole)
{
    double left = ceil(expires - now);
    if (left < 1.0)
        return 1;
    return left < (double)whole ? (uint32_t)left : whole;
}

PyObject *pylvs_sync_chunk(PylvsEngine *e, PyObject *args)
{
    unsigned long start;
    PyObject *arr;
    double now = NAN;
    if (!PyArg_ParseTuple(args, "kO|d:sync_chunk", &start, &arr, &now))
        return NULL;
    Py_buffer v;
    if (get_records(arr, "out", 1, &v) < 0)
        return NULL;
    struct sync_rec *out = v.buf;
    uint64_t room = (uint64_t)v.shape[0], n = 0;
    uint32_t slot = start < e->high ? (uint32_t)start : e->high;
    for (; slot < e->high && n < room; slot++) {
        const struct conn *c = &e->conns[slot];
        if (!c->used || (c->flags & CONN_F_UNHASHED))
            continue;
        sync_fill(e, c, &out[n]);
        /* A conn's record carries the time it has left, not its state's
         * whole timeout: a bulk answer restarting every timer would keep a
         * conn whose end was lost alive for as long as directors keep
         * asking (a template's timeout is its persistence, kept whole). */
        if (!isnan(now) && !(c->flags & CONN_F_TEMPLATE))
            out[n].timeout = sync_left(c->expires, now, out[n].timeout);
        n++;
    }
    PyBuffer_Release(&v);
    return Py_BuildValue("(Kl)", (unsigned long long)n, slot < e->high ? (long)slot : -1L);
}

/* --- the backup: ip_vs_proc_conn ------------------------------------------ */

/* The dest of service s at daddr:dport, else at daddr with port 0 (the
 * kernel's ip_vs_find_dest), or -1. */
static long sync_find_dest(const PylvsEngine *e, int s, uint32_t daddr, uint16_t dport)
{
    long zero = -1;
    for (uint32_t d = 0; d < e->ndests; d++) {
        const dest_row *r = &e->dests[d];
        if (!(r->flags & DEST_F_USED) || r->svc != (uint16_t)s || r->daddr != daddr)
            continue;
        if (r->dport == dport)
            return d;
        if (r->dport == 0 && zero < 0)
            zero = d;
    }
    return zero;
}

/* The live conn or template under an IN key, or NO_SLOT; a dead one found
 * is expired as a frame's lookup would. */
static uint32_t sync_lookup(PylvsEngine *e, uint8_t proto, uint32_t caddr, uint16_t cport,
                            uint32_t vaddr, uint16_t vport, double now)
{
    uint64_t h = key_hash(e, proto, caddr, cport, vaddr, vport);
    struct bucket *b = index_find(e, h, proto, caddr, cport, vaddr, vport);
    if (b == NULL || ((b->ref - 1) & 1) != KEY_IN)
        return NO_SLOT;
    uint32_t slot = (b->ref - 1) >> 1;
    if (e->conns[slot].expires <= now && !tpl_held(&e->conns[slot])) {
        conn_remove(e, slot, ST_CONNS_EXPIRED);
        return NO_SLOT;
    }
    return slot;
}

/* The engine's state for a record's (checked) state. */
static uint8_t sync_state(const struct sync_rec *r, int tpl)
{
    return !tpl && r->proto == PROTO_UDP ? UDP_STATE : (uint8_t)r->state;
}

/* What every install sets from the record, new conn or old: state, the
 * sync memory, in_pkts and the timer (ip_vs_proc_conn's tail). */
static void sync_apply(PylvsEngine *e, struct conn *c, const struct sync_rec *r, int tpl,
                       double now)
{
    uint8_t st = sync_state(r, tpl);
    if (!tpl && c->dest < e->max_dests && state_active(c->state) != state_active(st)) {
        int32_t v = state_active(st) ? 1 : -1;
        dest_conns_add(e, c->dest, C_ACTIVE, v);
        dest_conns_add(e, c->dest, C_INACTIVE, -v);
    }
    c->state = st;
    c->sync_old = (uint8_t)(st & 0x0f);
    c->in_pkts = (uint32_t)e->sysctl[SYS_SYNC_THRESHOLD];
    double timeout;
    if (tpl) {
        c->tpl_timeout = r->timeout ? r->timeout : SYNC_TPL_DEFAULT_TIMEOUT;
        timeout = c->tpl_timeout;
    } else {
        timeout = r->timeout ? (double)r->timeout : e->timeouts[st];
    }
    c->expires = now + timeout;
}

/* A new conn or template from a record whose service is s and dest d. */
static int sync_new(PylvsEngine *e, const struct sync_rec *r, int tpl, int s, long d,
                    double now)
{
    const dest_row *dest = &e->dests[d];
    uint8_t proto = (uint8_t)(tpl ? r->proto | TPL_PROTO : r->proto);
    /* ip_vs_bind_dest: a synced conn takes the forwarding method of this
     * director's dest. */
    uint8_t xmit = tpl ? XMIT_NONE : conn_bind_xmit(dest);
    uint64_t hout = 0;
    if (xmit == XMIT_NAT) {
        hout = key_hash(e, proto, r->daddr, r->dport, r->caddr, r->cport);
        struct bucket *ob = index_find(e, hout, proto, r->daddr, r->dport, r->caddr, r->cport);
        if (ob != NULL) {
            uint32_t o = (ob->ref - 1) >> 1;
            if (e->conns[o].expires > now)
                return ST_SYNC_REJECTED; /* another conn holds the real-server side */
            conn_remove(e, o, ST_CONNS_EXPIRED);
        }
        if (r->daddr == r->caddr && r->dport == r->cport && r->caddr == r->vaddr &&
            r->cport == r->vport)
            return ST_SYNC_REJECTED;
    }
    int64_t victim = conn_table_full(e) ? conn_victim(e, now) : -1;
    uint32_t slot = conn_table_full(e) && victim < 0 ? NO_SLOT : conn_alloc(e, victim, now);
    if (slot == NO_SLOT)
        return ST_SYNC_TABLE_FULL;
    struct conn *c = &e->conns[slot];
    memset(c, 0, sizeof(*c));
    c->proto = proto;
    c->caddr = r->caddr;
    c->cport = r->cport;
    c->vaddr = r->vaddr;
    c->vport = r->vport;
    c->daddr = r->daddr;
    c->dport = r->dport;
    c->fwd = dest->fwd;
    c->svc = (uint16_t)s;
    c->dest = (uint32_t)d;
    c->xmit = xmit;
    c->in_port = NO_PORT16;
    c->flags = (uint8_t)(CONN_F_SYNCED | (tpl ? CONN_F_TEMPLATE : CONN_F_NO_L2));
    c->state = tpl ? 0 : sync_state(r, 0);
    sync_conn_init(c, now);
    c->used = 1;
    index_insert(e, key_hash(e, proto, r->caddr, r->cport, r->vaddr, r->vport), slot, KEY_IN);
    if (xmit == XMIT_NAT)
        index_insert(e, hout, slot, KEY_OUT);
    e->conn_count++;
    e->stats[ST_CONNS_CREATED]++;
    if (tpl)
        dest_persist_add(e, (uint32_t)d, 1);
    else
        dest_conns_add(e, (uint32_t)d, state_active(c->state) ? C_ACTIVE : C_INACTIVE, 1);
    dest_overload_bind(e, (uint32_t)d);
    sync_apply(e, c, r, tpl, now);
    return ST_SYNC_INSTALLED;
}

/* One record: the counter it bumps (ST_SYNC_*). */
static int sync_install_one(PylvsEngine *e, const struct sync_rec *r, double now)
{
    int tpl = (r->flags & IPVS_F_TEMPLATE) != 0;
    /* ip_vs_proc_sync_conn's checks, and what this engine cannot hold. */
    if (r->proto != PROTO_TCP && r->proto != PROTO_UDP)
        return ST_SYNC_REJECTED;
    if ((r->flags & IPVS_F_FWD_MASK) > FWD_ROUTE)
        return ST_SYNC_REJECTED;
    if (tpl ? r->state >= CTPL_S_LAST || r->cport != 0
            : r->proto == PROTO_TCP ? r->state >= N_TCP_STATES : r->state != IPVS_UDP_S_NORMAL)
        return ST_SYNC_REJECTED;
    if (r->fwmark != 0)
        return ST_SYNC_NO_DEST; /* no fwmark services here */
    uint32_t flags = r->flags & IPVS_F_BACKUP_MASK;
    uint8_t proto = (uint8_t)(tpl ? r->proto | TPL_PROTO : r->proto);
    uint32_t slot = sync_lookup(e, proto, r->caddr, r->cport, r->vaddr, r->vport, now);
    if (slot != NO_SLOT && !tpl &&
        (e->conns[slot].daddr != r->daddr || e->conns[slot].dport != r->dport)) {
        /* The conn went to another real server here: an active record
         * replaces it, an inactive one is the last word of the conn it
         * replaced and is ignored. */
        if (flags & IPVS_F_INACTIVE)
            return ST_SYNC_STALE;
        conn_remove(e, slot, ST_CONNS_EXPIRED);
        slot = NO_SLOT;
    }
    if (slot != NO_SLOT) {
        sync_apply(e, &e->conns[slot], r, tpl, now);
        return ST_SYNC_UPDATED;
    }
    int s = find_service(e, r->proto, r->vaddr, r->vport);
    if (s < 0)
        return ST_SYNC_NO_DEST;
    long d = sync_find_dest(e, s, r->daddr, r->dport);
    if (d < 0)
        return ST_SYNC_NO_DEST;
    return sync_new(e, r, tpl, s, d, now);
}

PyObject *pylvs_sync_install(PylvsEngine *e, PyObject *args)
{
    PyObject *arr;
    double now;
    if (!PyArg_ParseTuple(args, "Od:sync_install", &arr, &now))
        return NULL;
    if (e->busy) {
        PyErr_SetString(PyExc_RuntimeError,
                        "Engine is inside a scheduler upcall and cannot be changed or re-entered");
        return NULL;
    }
    Py_buffer v;
    if (get_records(arr, "records", 0, &v) < 0)
        return NULL;
    const struct sync_rec *recs = v.buf;
    long done = 0;
    for (Py_ssize_t i = 0; i < v.shape[0]; i++) {
        int st = sync_install_one(e, &recs[i], now);
        e->stats[st]++;
        done += st == ST_SYNC_INSTALLED || st == ST_SYNC_UPDATED;
    }
    PyBuffer_Release(&v);
    return PyLong_FromLong(done);
}
