/* The Engine type: the Python face of the engine (docs/engine.md).
 *
 * Memory shared with Python (counters, service and dest tables, batches) is
 * held through Py_buffer views for as long as the engine points into it. The
 * only Python call on the frame path is the scheduler upcall for a new flow.
 */
#include "ip_vs.h"

#include <math.h>

/* tables.SYSCTL_DEFAULTS */
static const int64_t sysctl_defaults[SYS__COUNT] = {1, 0, 1000, 50, 1000, 50, 1000, 50,
                                                     0, 0, 1, 0, 0, 0, 1024, 10, 0, 1000,
                                                     3, 50, 0, 0, 65536, 0, 1};

static PyTypeObject EngineType;

int pylvs_engine_check(PyObject *obj)
{
    return PyObject_TypeCheck(obj, &EngineType);
}

/* --- buffers from Python -------------------------------------------------- */

/* Does the view hold plain numbers of this kind ('u', 'i', 'f') and size in
 * native (little-endian) order? */
static int format_is(const Py_buffer *v, char kind, Py_ssize_t itemsize)
{
    const char *f = v->format ? v->format : "B";
    if (*f == '@' || *f == '=' || *f == '<' || *f == '|')
        f++;
    if (f[0] == '\0' || f[1] != '\0')
        return 0;
    const char *set = kind == 'u' ? "BHILQN" : kind == 'i' ? "bhilqn" : "efd";
    return strchr(set, f[0]) != NULL && v->itemsize == itemsize;
}

/* Get a C-contiguous numeric array view of `obj`, checked against the
 * expected type and shape (-1: any extent). `what` names it in errors. */
int get_array(PyObject *obj, const char *what, char kind, Py_ssize_t itemsize,
                     const char *tname, int ndim, const Py_ssize_t *shape, int writable,
                     Py_buffer *out)
{
    if (!PyObject_CheckBuffer(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy %s array, not %.100s", what, tname,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, out, flags) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s must be a C-contiguous%s %s array", what,
                     writable ? ", writable" : "", tname);
        return -1;
    }
    if (!format_is(out, kind, itemsize)) {
        PyErr_Format(PyExc_TypeError, "%s must have dtype %s (buffer format '%s')", what,
                     tname, out->format ? out->format : "B");
        goto fail;
    }
    if (out->ndim != ndim) {
        PyErr_Format(PyExc_ValueError, "%s must have %d dimension(s), not %d", what, ndim,
                     out->ndim);
        goto fail;
    }
    for (int i = 0; i < ndim; i++) {
        if (shape[i] >= 0 && out->shape[i] != shape[i]) {
            PyErr_Format(PyExc_ValueError, "%s: dimension %d must be %zd, not %zd", what, i,
                         shape[i], out->shape[i]);
            goto fail;
        }
    }
    return 0;
fail:
    PyBuffer_Release(out);
    return -1;
}

static int get_attr_array(PyObject *owner, const char *attr, const char *what, char kind,
                          Py_ssize_t itemsize, const char *tname, int ndim,
                          const Py_ssize_t *shape, int writable, Py_buffer *out)
{
    PyObject *obj = PyObject_GetAttrString(owner, attr);
    if (obj == NULL)
        return -1;
    int r = get_array(obj, what, kind, itemsize, tname, ndim, shape, writable, out);
    Py_DECREF(obj);
    return r;
}

static void release(Py_buffer *v)
{
    if (v->obj != NULL)
        PyBuffer_Release(v);
    memset(v, 0, sizeof(*v));
}

static int load_transitions(PylvsEngine *e, PyObject *obj)
{
    static const Py_ssize_t shape[3] = {N_DIRS, N_EVENTS, N_TCP_STATES};
    Py_buffer v;
    if (get_array(obj, "transitions", 'u', 1, "uint8", 3, shape, 0, &v) < 0)
        return -1;
    const uint8_t *t = v.buf;
    for (size_t i = 0; i < sizeof(e->trans); i++) {
        if (t[i] >= N_TCP_STATES) {
            PyErr_Format(PyExc_ValueError, "transitions holds state %d; TCP states are 0..%d",
                         t[i], N_TCP_STATES - 1);
            PyBuffer_Release(&v);
            return -1;
        }
    }
    memcpy(e->trans, t, sizeof(e->trans));
    PyBuffer_Release(&v);
    return 0;
}

static int load_timeouts(PylvsEngine *e, PyObject *obj)
{
    static const Py_ssize_t shape[1] = {N_TIMEOUTS};
    Py_buffer v;
    if (get_array(obj, "timeouts", 'f', 8, "float64", 1, shape, 0, &v) < 0)
        return -1;
    const double *t = v.buf;
    for (int i = 0; i < N_TIMEOUTS; i++) {
        if (!isfinite(t[i])) {
            PyErr_Format(PyExc_ValueError, "timeouts[%d] is not a finite number", i);
            PyBuffer_Release(&v);
            return -1;
        }
    }
    memcpy(e->timeouts, t, sizeof(e->timeouts));
    PyBuffer_Release(&v);
    return 0;
}

static int load_counters(PylvsEngine *e, PyObject *counters)
{
    static const Py_ssize_t stats_shape[1] = {PYLVS_N_STATS};
    static const Py_ssize_t traffic_shape[2] = {-1, N_TRAFFIC};
    static const Py_ssize_t conns_shape[2] = {-1, 2};
    static const Py_ssize_t persist_shape[1] = {-1};
    if (get_attr_array(counters, "stats", "counters.stats", 'u', 8, "uint64", 1, stats_shape,
                       1, &e->stats_view) < 0 ||
        get_attr_array(counters, "svc_stats", "counters.svc_stats", 'u', 8, "uint64", 2,
                       traffic_shape, 1, &e->svc_stats_view) < 0 ||
        get_attr_array(counters, "dest_stats", "counters.dest_stats", 'u', 8, "uint64", 2,
                       traffic_shape, 1, &e->dest_stats_view) < 0 ||
        get_attr_array(counters, "dest_conns", "counters.dest_conns", 'i', 4, "int32", 2,
                       conns_shape, 1, &e->dest_conns_view) < 0 ||
        get_attr_array(counters, "dest_persist", "counters.dest_persist", 'i', 4, "int32", 1,
                       persist_shape, 1, &e->dest_persist_view) < 0)
        return -1;
    static const Py_ssize_t state_shape[2] = {-1, SCHED_STATE_WORDS};
    if (get_attr_array(counters, "dest_flags", "counters.dest_flags", 'u', 1, "uint8", 1,
                       conns_shape, 1, &e->dest_flags_view) < 0 ||
        get_attr_array(counters, "sched_state", "counters.sched_state", 'i', 4, "int32", 2,
                       state_shape, 1, &e->sched_state_view) < 0)
        return -1;
    if (e->dest_flags_view.shape[0] != e->dest_conns_view.shape[0] ||
        e->sched_state_view.shape[0] != e->svc_stats_view.shape[0]) {
        PyErr_SetString(PyExc_ValueError, "counters.dest_flags must have one row per dest and "
                                          "counters.sched_state one per service");
        return -1;
    }
    e->dest_flags = e->dest_flags_view.buf;
    e->sched_state = e->sched_state_view.buf;
    if (e->dest_stats_view.shape[0] != e->dest_conns_view.shape[0] ||
        e->dest_stats_view.shape[0] != e->dest_persist_view.shape[0]) {
        PyErr_SetString(PyExc_ValueError,
                        "counters.dest_stats, dest_conns and dest_persist must have one row "
                        "per dest");
        return -1;
    }
    if (e->svc_stats_view.shape[0] > 65536 || e->dest_stats_view.shape[0] > (1 << 30)) {
        PyErr_SetString(PyExc_ValueError, "counters: too many service or dest rows");
        return -1;
    }
    e->stats = e->stats_view.buf;
    e->svc_stats = e->svc_stats_view.buf;
    e->dest_stats = e->dest_stats_view.buf;
    e->dest_conns = e->dest_conns_view.buf;
    e->dest_persist = e->dest_persist_view.buf;
    e->max_services = (uint32_t)e->svc_stats_view.shape[0];
    e->max_dests = (uint32_t)e->dest_stats_view.shape[0];
    return 0;
}

/* --- the Python type ------------------------------------------------------ */

static int engine_traverse(PylvsEngine *self, visitproc visit, void *arg)
{
    Py_VISIT(self->schedule);
    Py_VISIT(self->counters);
    return 0;
}

static int engine_clear(PylvsEngine *self)
{
    Py_CLEAR(self->schedule);
    Py_CLEAR(self->counters);
    return 0;
}

static void engine_dealloc(PylvsEngine *self)
{
    PyObject_GC_UnTrack(self);
    engine_clear(self);
    release(&self->stats_view);
    release(&self->svc_stats_view);
    release(&self->dest_stats_view);
    release(&self->dest_conns_view);
    release(&self->dest_persist_view);
    release(&self->dest_flags_view);
    release(&self->sched_state_view);
    release(&self->sched_svc_view);
    release(&self->sched_dest_view);
    release(&self->thresh_view);
    release(&self->sched_table_view);
    release(&self->services_view);
    release(&self->dests_view);
    for (int k = 0; k < N_BATCH_ARRAYS; k++)
        release(&self->batch_views[k]);
    pthread_mutex_destroy(&self->mu);
    sync_free(self);
    PyMem_RawFree(self->scratch);
    PyMem_Free(self->net.ports);
    PyMem_Free(self->net.routes);
    PyMem_Free(self->net.local);
    conn_table_free(self);
    PyMem_Free(self->svc_hash);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *engine_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"capacity", "key", "transitions", "timeouts",
                             "counters", "schedule", NULL};
    Py_ssize_t capacity;
    Py_buffer key;
    PyObject *transitions, *timeouts, *counters, *schedule;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "n$y*OOOO:Engine", kwlist, &capacity, &key,
                                     &transitions, &timeouts, &counters, &schedule))
        return NULL;
    if (key.len != 16) {
        PyErr_Format(PyExc_ValueError, "key must be 16 bytes, not %zd", key.len);
        PyBuffer_Release(&key);
        return NULL;
    }
    uint64_t k0 = pylvs_le64(key.buf), k1 = pylvs_le64((uint8_t *)key.buf + 8);
    PyBuffer_Release(&key);
    if (capacity < 1 || capacity > MAX_CAPACITY) {
        PyErr_Format(PyExc_ValueError, "capacity must be 1..%u, not %zd", MAX_CAPACITY,
                     capacity);
        return NULL;
    }
    if (!PyCallable_Check(schedule)) {
        PyErr_SetString(PyExc_TypeError, "schedule must be callable");
        return NULL;
    }

    PylvsEngine *self = (PylvsEngine *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    pthread_mutex_init(&self->mu, NULL);
    self->k0 = k0;
    self->k1 = k1;
    self->ip_id = (uint16_t)k0;
    for (int i = 0; i < SYS__COUNT; i++)
        self->sysctl[i] = sysctl_defaults[i];
    self->ops_slot = NO_SLOT;
    if (load_transitions(self, transitions) < 0 || load_timeouts(self, timeouts) < 0 ||
        load_counters(self, counters) < 0)
        goto fail;
    Py_INCREF(counters);
    self->counters = counters;
    Py_INCREF(schedule);
    self->schedule = schedule;

    if (conn_table_init(self, (uint32_t)capacity) < 0)
        goto fail;
    return (PyObject *)self;
fail:
    Py_DECREF(self);
    return NULL;
}

static int refuse_if_busy(PylvsEngine *self)
{
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError,
                        "Engine is inside a scheduler upcall and cannot be changed or re-entered");
        return -1;
    }
    return 0;
}

/* --- the engine lock (workers: docs/io.md) -------------------------------- */

static int held_by_me(PylvsEngine *e)
{
    return e->busy && pthread_equal(__atomic_load_n(&e->owner, __ATOMIC_RELAXED), pthread_self());
}

void pylvs_engine_lock(PylvsEngine *e, PyThreadState *nogil)
{
    pthread_mutex_lock(&e->mu);
    __atomic_store_n(&e->owner, pthread_self(), __ATOMIC_RELAXED);
    e->nogil = nogil;
}

PyThreadState *pylvs_engine_unlock(PylvsEngine *e)
{
    PyThreadState *ts = e->nogil;
    e->nogil = NULL;
    pthread_mutex_unlock(&e->mu);
    return ts;
}

int pylvs_engine_reentered(PylvsEngine *e)
{
    return held_by_me(e);
}

/* Take the lock for a method called from Python (GIL held). A worker that
 * holds it may need the GIL for its upcall, so the GIL is let go while
 * waiting; a scheduler calling back into its own engine is refused. */
static int engine_enter(PylvsEngine *self)
{
    if (held_by_me(self)) {
        PyErr_SetString(PyExc_RuntimeError,
                        "Engine is inside a scheduler upcall and cannot be changed or re-entered");
        return -1;
    }
    if (pthread_mutex_trylock(&self->mu) != 0) {
        Py_BEGIN_ALLOW_THREADS
        pthread_mutex_lock(&self->mu);
        Py_END_ALLOW_THREADS
    }
    __atomic_store_n(&self->owner, pthread_self(), __ATOMIC_RELAXED);
    return 0;
}

typedef PyObject *(*engine_meth)(PylvsEngine *, PyObject *);

static PyObject *locked(PylvsEngine *self, PyObject *arg, engine_meth fn)
{
    if (engine_enter(self) < 0)
        return NULL;
    PyObject *r = fn(self, arg);
    pthread_mutex_unlock(&self->mu);
    return r;
}

/* Reading from inside the upcall is allowed (as before workers): the
 * calling thread already holds the lock. */
static PyObject *locked_read(PylvsEngine *self, PyObject *arg, engine_meth fn)
{
    if (held_by_me(self))
        return fn(self, arg);
    return locked(self, arg, fn);
}

#define LOCKED_READ(fn)                                                  \
    static PyObject *fn##_locked(PylvsEngine *self, PyObject *arg)      \
    {                                                                    \
        return locked_read(self, arg, (engine_meth)fn);                  \
    }

#define LOCKED(fn)                                                       \
    static PyObject *fn##_locked(PylvsEngine *self, PyObject *arg)      \
    {                                                                    \
        return locked(self, arg, (engine_meth)fn);                       \
    }

static PyObject *tables_module;

/* The dtype objects of tables.py, and a check that the C row structs still
 * match them field by field. */
static int check_dtype(PyObject *arr, const char *what, const char *dtype_name,
                       const char *const *fields, const Py_ssize_t *offsets, Py_ssize_t size)
{
    if (tables_module == NULL) {
        tables_module = PyImport_ImportModule("pylvs.engine.tables");
        if (tables_module == NULL)
            return -1;
    }
    PyObject *want = PyObject_GetAttrString(tables_module, dtype_name);
    if (want == NULL)
        return -1;
    PyObject *have = PyObject_GetAttrString(arr, "dtype");
    if (have == NULL) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s must be a numpy array of tables.%s, not %.100s", what,
                     dtype_name, Py_TYPE(arr)->tp_name);
        Py_DECREF(want);
        return -1;
    }
    int eq = PyObject_RichCompareBool(have, want, Py_EQ);
    Py_DECREF(have);
    if (eq != 1) {
        if (eq == 0)
            PyErr_Format(PyExc_TypeError, "%s must have dtype tables.%s", what, dtype_name);
        Py_DECREF(want);
        return -1;
    }
    int ok = 1;
    PyObject *itemsize = PyObject_GetAttrString(want, "itemsize");
    PyObject *fdict = PyObject_GetAttrString(want, "fields");
    if (itemsize == NULL || fdict == NULL || PyLong_AsSsize_t(itemsize) != size)
        ok = 0;
    for (int i = 0; ok && fields[i] != NULL; i++) {
        PyObject *f = fdict ? PyMapping_GetItemString(fdict, fields[i]) : NULL;
        if (f == NULL || !PyTuple_Check(f) || PyTuple_GET_SIZE(f) < 2 ||
            PyLong_AsSsize_t(PyTuple_GET_ITEM(f, 1)) != offsets[i])
            ok = 0;
        Py_XDECREF(f);
    }
    Py_XDECREF(itemsize);
    Py_XDECREF(fdict);
    Py_DECREF(want);
    if (!ok) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "tables.%s no longer matches the row layout in ip_vs.h",
                     dtype_name);
        return -1;
    }
    return 0;
}

int get_table(PyObject *arr, const char *what, const char *dtype_name,
                     const char *const *fields, const Py_ssize_t *offsets, Py_ssize_t size,
                     uint32_t max_rows, Py_buffer *out)
{
    if (check_dtype(arr, what, dtype_name, fields, offsets, size) < 0)
        return -1;
    if (PyObject_GetBuffer(arr, out, PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s must be a C-contiguous array", what);
        return -1;
    }
    if (out->ndim != 1 || out->itemsize != size) {
        PyErr_Format(PyExc_ValueError, "%s must be one-dimensional", what);
        PyBuffer_Release(out);
        return -1;
    }
    if (out->shape[0] > (Py_ssize_t)max_rows) {
        PyErr_Format(PyExc_ValueError, "%s has %zd rows but the counters have room for %u",
                     what, out->shape[0], max_rows);
        PyBuffer_Release(out);
        return -1;
    }
    return 0;
}

/* The service hash of find_service: open addressing over the used slots of
 * `services`, at most half full; the lowest slot wins if a key repeats (as
 * the reference engine's dict). NULL with MemoryError set. */
static int32_t *build_svc_hash(const PylvsEngine *e, const svc_row *services, uint32_t n,
                               uint32_t *mask_out)
{
    uint32_t used = 0;
    for (uint32_t s = 0; s < n; s++)
        used += (services[s].flags & SVC_F_USED) != 0;
    uint32_t size = 8;
    while (size < 2 * used)
        size <<= 1;
    int32_t *hash = PyMem_Malloc((size_t)size * sizeof(int32_t));
    if (hash == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    memset(hash, 0xff, (size_t)size * sizeof(int32_t));
    uint32_t mask = size - 1;
    for (uint32_t s = 0; s < n; s++) {
        const svc_row *r = &services[s];
        if (!(r->flags & SVC_F_USED))
            continue;
        uint32_t i = (uint32_t)svc_key_hash(e, r->proto, r->vaddr, r->vport) & mask;
        for (;;) {
            int32_t t = hash[i];
            if (t < 0) {
                hash[i] = (int32_t)s;
                break;
            }
            const svc_row *o = &services[t];
            if (o->proto == r->proto && o->vaddr == r->vaddr && o->vport == r->vport)
                break;
            i = (i + 1) & mask;
        }
    }
    *mask_out = mask;
    return hash;
}

static PyObject *engine_set_tables(PylvsEngine *self, PyObject *args)
{
    static const char *const svc_fields[] = {"vaddr", "vport", "proto", "flags", "timeout",
                                             "netmask", NULL};
    static const Py_ssize_t svc_offsets[] = {
        offsetof(svc_row, vaddr), offsetof(svc_row, vport), offsetof(svc_row, proto),
        offsetof(svc_row, flags), offsetof(svc_row, timeout), offsetof(svc_row, netmask)};
    static const char *const dest_fields[] = {"daddr", "dport", "svc", "weight", "fwd",
                                              "flags", "out_port", "dmac", "smac",
                                              "tun_type", "tun_flags", "tun_port", NULL};
    static const Py_ssize_t dest_offsets[] = {
        offsetof(dest_row, daddr), offsetof(dest_row, dport), offsetof(dest_row, svc),
        offsetof(dest_row, weight), offsetof(dest_row, fwd), offsetof(dest_row, flags),
        offsetof(dest_row, out_port), offsetof(dest_row, dmac), offsetof(dest_row, smac),
        offsetof(dest_row, tun_type), offsetof(dest_row, tun_flags), offsetof(dest_row, tun_port)};
    PyObject *services, *dests;
    if (!PyArg_ParseTuple(args, "OO:set_tables", &services, &dests))
        return NULL;
    if (refuse_if_busy(self) < 0)
        return NULL;
    Py_buffer sv, dv;
    if (get_table(services, "services", "SERVICE_DTYPE", svc_fields, svc_offsets,
                  sizeof(svc_row), self->max_services, &sv) < 0)
        return NULL;
    if (get_table(dests, "dests", "DEST_DTYPE", dest_fields, dest_offsets, sizeof(dest_row),
                  self->max_dests, &dv) < 0) {
        PyBuffer_Release(&sv);
        return NULL;
    }
    uint32_t svc_mask;
    int32_t *svc_hash = build_svc_hash(self, sv.buf, (uint32_t)sv.shape[0], &svc_mask);
    if (svc_hash == NULL) {
        PyBuffer_Release(&sv);
        PyBuffer_Release(&dv);
        return NULL;
    }
    PyMem_Free(self->svc_hash);
    self->svc_hash = svc_hash;
    self->svc_mask = svc_mask;
    self->nullsvc = 0;
    for (Py_ssize_t i = 0; i < sv.shape[0]; i++) {
        const svc_row *r = (const svc_row *)sv.buf + i;
        self->nullsvc += (r->flags & SVC_F_USED) && r->vport == 0;
    }
    release(&self->services_view);
    release(&self->dests_view);
    self->services_view = sv;
    self->dests_view = dv;
    self->services = sv.buf;
    self->dests = dv.buf;
    self->nservices = (uint32_t)sv.shape[0];
    self->ndests = (uint32_t)dv.shape[0];
    self->have_tables = 1;
    Py_RETURN_NONE;
}

/* set_sched(sched_svcs, sched_dests, thresholds, sched_table): the tables of the
 * schedulers in C and the dests' thresholds (ip_vs_sched.h), held like the
 * service and dest tables: published arrays are never written again. */
static PyObject *engine_set_sched(PylvsEngine *self, PyObject *args)
{
    static const char *const svc_fields[] = {"kind", "flags", "first", "count", "table", NULL};
    static const Py_ssize_t svc_offsets[] = {
        offsetof(sched_svc_row, kind), offsetof(sched_svc_row, flags),
        offsetof(sched_svc_row, first), offsetof(sched_svc_row, count),
        offsetof(sched_svc_row, table)};
    static const Py_ssize_t any[1] = {-1};
    static const char *const dest_fields[] = {"slot", "weight", NULL};
    static const Py_ssize_t dest_offsets[] = {offsetof(sched_dest_row, slot),
                                              offsetof(sched_dest_row, weight)};
    static const char *const thresh_fields[] = {"u_threshold", "l_threshold", NULL};
    static const Py_ssize_t thresh_offsets[] = {offsetof(dest_thresh_row, u_threshold),
                                                offsetof(dest_thresh_row, l_threshold)};
    PyObject *svcs, *dests, *thresh, *table;
    if (!PyArg_ParseTuple(args, "OOOO:set_sched", &svcs, &dests, &thresh, &table))
        return NULL;
    if (refuse_if_busy(self) < 0)
        return NULL;
    Py_buffer v[4];
    memset(v, 0, sizeof(v));
    if (get_table(svcs, "sched_svcs", "SCHED_SVC_DTYPE", svc_fields, svc_offsets,
                  sizeof(sched_svc_row), self->max_services, &v[0]) < 0 ||
        get_table(dests, "sched_dests", "SCHED_DEST_DTYPE", dest_fields, dest_offsets,
                  sizeof(sched_dest_row), UINT32_MAX, &v[1]) < 0 ||
        get_table(thresh, "thresholds", "DEST_THRESH_DTYPE", thresh_fields, thresh_offsets,
                  sizeof(dest_thresh_row), self->max_dests, &v[2]) < 0 ||
        get_array(table, "sched_table", 'i', 4, "int32", 1, any, 0, &v[3]) < 0 ||
        sched_check_tables(v[0].buf, (uint32_t)v[0].shape[0], v[1].buf,
                           (uint32_t)v[1].shape[0], v[3].buf, (uint32_t)v[3].shape[0],
                           self->max_dests) < 0) {
        for (int k = 0; k < 4; k++)
            release(&v[k]);
        return NULL;
    }
    release(&self->sched_svc_view);
    release(&self->sched_dest_view);
    release(&self->thresh_view);
    release(&self->sched_table_view);
    self->sched_svc_view = v[0];
    self->sched_dest_view = v[1];
    self->thresh_view = v[2];
    self->sched_table_view = v[3];
    self->sched_table = v[3].buf;
    self->sched_svc = v[0].buf;
    self->sched_dest = v[1].buf;
    self->thresh = v[2].buf;
    self->nsched_svc = (uint32_t)v[0].shape[0];
    self->nthresh = (uint32_t)v[2].shape[0];
    Py_RETURN_NONE;
}

static PyObject *engine_set_timeouts(PylvsEngine *self, PyObject *arg)
{
    if (refuse_if_busy(self) < 0 || load_timeouts(self, arg) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* --- defence (docs/engine.md, "Defence"): what control decides each second */

static PyObject *engine_set_transitions(PylvsEngine *self, PyObject *arg)
{
    if (refuse_if_busy(self) < 0 || load_transitions(self, arg) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *engine_set_drop_rate(PylvsEngine *self, PyObject *args)
{
    long long rate, counter = -1;
    if (!PyArg_ParseTuple(args, "L|L:set_drop_rate", &rate, &counter))
        return NULL;
    if (rate < 0) {
        PyErr_SetString(PyExc_ValueError, "drop rate must not be negative");
        return NULL;
    }
    self->drop_rate = rate;
    if (counter >= 0)
        self->drop_counter = counter;
    Py_RETURN_NONE;
}

static PyObject *engine_expire_nodest(PylvsEngine *self, PyObject *unused)
{
    (void)unused;
    if (refuse_if_busy(self) < 0)
        return NULL;
    return PyLong_FromLong(conn_expire_nodest(self));
}

static PyObject *engine_drop_entries(PylvsEngine *self, PyObject *args)
{
    double now;
    if (!PyArg_ParseTuple(args, "d:drop_entries", &now))
        return NULL;
    if (refuse_if_busy(self) < 0)
        return NULL;
    return PyLong_FromLong(conn_drop_entries(self, now));
}

/* Copy a checked table's rows, for the engine to own. */
static void *copy_rows(const Py_buffer *v, size_t row)
{
    size_t n = (size_t)v->shape[0];
    void *copy = PyMem_Malloc(n ? n * row : 1);
    if (copy == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    memcpy(copy, v->buf, n * row);
    return copy;
}

static PyObject *engine_set_ports(PylvsEngine *self, PyObject *arg)
{
    static const char *const fields[] = {"addr", "mtu", "mac", "flags", "rp_filter", NULL};
    static const Py_ssize_t offsets[] = {offsetof(port_row, addr), offsetof(port_row, mtu),
                                         offsetof(port_row, mac), offsetof(port_row, flags),
                                         offsetof(port_row, rp_filter)};
    if (refuse_if_busy(self) < 0)
        return NULL;
    Py_buffer v;
    if (get_table(arg, "ports", "PORT_DTYPE", fields, offsets, sizeof(port_row), 65536, &v) < 0)
        return NULL;
    port_row *rows = copy_rows(&v, sizeof(port_row));
    uint32_t n = (uint32_t)v.shape[0];
    PyBuffer_Release(&v);
    if (rows == NULL)
        return NULL;
    PyMem_Free(self->net.ports);
    self->net.ports = rows;
    self->net.nports = n;
    Py_RETURN_NONE;
}

static PyObject *engine_set_routes(PylvsEngine *self, PyObject *args)
{
    static const char *const fields[] = {"prefix", "plen", "port", "mac", "flags", NULL};
    static const Py_ssize_t offsets[] = {offsetof(route_row, prefix), offsetof(route_row, plen),
                                         offsetof(route_row, port), offsetof(route_row, mac),
                                         offsetof(route_row, flags)};
    PyObject *routes, *local;
    if (!PyArg_ParseTuple(args, "OO:set_routes", &routes, &local))
        return NULL;
    if (refuse_if_busy(self) < 0)
        return NULL;
    Py_buffer rv, lv;
    static const Py_ssize_t any[1] = {-1};
    if (get_table(routes, "routes", "ROUTE_DTYPE", fields, offsets, sizeof(route_row),
                  1u << 24, &rv) < 0)
        return NULL;
    if (get_array(local, "local", 'u', 4, "uint32", 1, any, 0, &lv) < 0) {
        PyBuffer_Release(&rv);
        return NULL;
    }
    route_row *r = NULL;
    uint32_t *l = NULL;
    const route_row *rin = rv.buf;
    const uint32_t *lin = lv.buf;
    for (Py_ssize_t i = 0; i < rv.shape[0]; i++) {
        if (rin[i].plen > 32) {
            PyErr_Format(PyExc_ValueError, "route prefix length %u is over 32", rin[i].plen);
            goto fail;
        }
    }
    for (Py_ssize_t i = 1; i < lv.shape[0]; i++) {
        if (lin[i] < lin[i - 1]) {
            PyErr_SetString(PyExc_ValueError, "local must be sorted ascending");
            goto fail;
        }
    }
    r = copy_rows(&rv, sizeof(route_row));
    l = r ? copy_rows(&lv, sizeof(uint32_t)) : NULL;
    if (l == NULL)
        goto fail;
    PyMem_Free(self->net.routes);
    PyMem_Free(self->net.local);
    self->net.routes = r;
    self->net.nroutes = (uint32_t)rv.shape[0];
    self->net.nhost = 0;
    while (self->net.nhost < self->net.nroutes && r[self->net.nhost].plen == 32 &&
           (self->net.nhost == 0 || r[self->net.nhost].prefix >= r[self->net.nhost - 1].prefix))
        self->net.nhost++;
    self->net.local = l;
    self->net.nlocal = (uint32_t)lv.shape[0];
    self->net.have_routes = 1;
    PyBuffer_Release(&rv);
    PyBuffer_Release(&lv);
    Py_RETURN_NONE;
fail:
    PyMem_Free(r);
    PyBuffer_Release(&rv);
    PyBuffer_Release(&lv);
    return NULL;
}

static PyObject *engine_set_sysctls(PylvsEngine *self, PyObject *arg)
{
    static const Py_ssize_t shape[1] = {SYS__COUNT};
    if (refuse_if_busy(self) < 0)
        return NULL;
    Py_buffer v;
    if (get_array(arg, "sysctls", 'i', 8, "int64", 1, shape, 0, &v) < 0)
        return NULL;
    const int64_t *in = v.buf;
    for (int i = 0; i < SYS__COUNT; i++) {
        if (in[i] < 0) {
            PyErr_SetString(PyExc_ValueError, "sysctl values must not be negative");
            PyBuffer_Release(&v);
            return NULL;
        }
    }
    memcpy(self->sysctl, in, sizeof(self->sysctl));
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}

/* The arrays of a tables.Batch, in batch_views order. */
static const struct batch_array {
    const char *attr, *what, *tname;
    Py_ssize_t itemsize;
    int ndim, writable;
} batch_arrays[N_BATCH_ARRAYS] = {
    {"buf", "batch.buf", "uint8", 1, 2, 1},
    {"length", "batch.length", "uint32", 4, 1, 0},
    {"in_port", "batch.in_port", "uint16", 2, 1, 0},
    {"verdict", "batch.verdict", "uint8", 1, 1, 1},
    {"out_port", "batch.out_port", "uint16", 2, 1, 1},
    {"emit_buf", "batch.emit_buf", "uint8", 1, 1, 1},
    {"emit_off", "batch.emit_off", "uint32", 4, 1, 1},
    {"emit_len", "batch.emit_len", "uint32", 4, 1, 1},
    {"emit_port", "batch.emit_port", "uint16", 2, 1, 1},
    {"emit_n", "batch.emit_n", "uint32", 4, 1, 1},
};

static PyObject *engine_process(PylvsEngine *self, PyObject *args)
{
    PyObject *batch;
    double now;
    if (!PyArg_ParseTuple(args, "Od:process", &batch, &now))
        return NULL;
    if (refuse_if_busy(self) < 0)
        return NULL;
    PyObject *arrays[N_BATCH_ARRAYS] = {NULL};
    PyObject *result = NULL;
    /* Interned names, made once: PyObject_GetAttrString would build and
     * hash a new str per attribute and call, a microsecond per batch. */
    static PyObject *names[N_BATCH_ARRAYS + 1];
    if (names[N_BATCH_ARRAYS] == NULL) {
        for (int k = 0; k <= N_BATCH_ARRAYS; k++) {
            if (names[k] == NULL &&
                (names[k] = PyUnicode_InternFromString(k < N_BATCH_ARRAYS ? batch_arrays[k].attr
                                                                          : "count")) == NULL)
                return NULL;
        }
    }
    for (int k = 0; k < N_BATCH_ARRAYS; k++) {
        arrays[k] = PyObject_GetAttr(batch, names[k]);
        if (arrays[k] == NULL)
            goto done;
    }
    /* Exporting a numpy buffer costs far more than a frame: the views of
     * the last batch's arrays are kept and reused while the batch still
     * holds the very same array objects. */
    int cached = self->batch_cached;
    for (int k = 0; k < N_BATCH_ARRAYS; k++)
        cached = cached && self->batch_views[k].obj == arrays[k];
    if (!cached) {
        Py_buffer views[N_BATCH_ARRAYS];
        memset(views, 0, sizeof(views));
        for (int k = 0; k < N_BATCH_ARRAYS; k++) {
            const struct batch_array *a = &batch_arrays[k];
            static const Py_ssize_t any[2] = {-1, -1};
            if (get_array(arrays[k], a->what, 'u', a->itemsize, a->tname, a->ndim, any,
                          a->writable, &views[k]) < 0) {
                for (int j = 0; j < k; j++)
                    release(&views[j]);
                goto done;
            }
        }
        for (int k = 0; k < N_BATCH_ARRAYS; k++) {
            release(&self->batch_views[k]);
            self->batch_views[k] = views[k];
        }
        self->batch_cached = 1;
    }
    const Py_buffer *buf = &self->batch_views[0], *length = &self->batch_views[1],
                    *in_port = &self->batch_views[2], *verdict = &self->batch_views[3],
                    *out_port = &self->batch_views[4];
    PyObject *count_obj = PyObject_GetAttr(batch, names[N_BATCH_ARRAYS]);
    if (count_obj == NULL)
        goto done;
    Py_ssize_t count = PyNumber_AsSsize_t(count_obj, PyExc_OverflowError);
    Py_DECREF(count_obj);
    if (count == -1 && PyErr_Occurred())
        goto done;
    if (count < 0 || count > buf->shape[0] || count > length->shape[0] ||
        count > in_port->shape[0] || count > verdict->shape[0] || count > out_port->shape[0]) {
        PyErr_Format(PyExc_ValueError, "batch.count %zd does not fit the batch arrays", count);
        goto done;
    }
    const uint32_t *lens = length->buf;
    Py_ssize_t slot = buf->shape[1];
    for (Py_ssize_t i = 0; i < count; i++) {
        if ((Py_ssize_t)lens[i] > slot) {
            PyErr_Format(PyExc_ValueError,
                         "batch.length[%zd] = %u is longer than the %zd-byte slot", i, lens[i],
                         slot);
            goto done;
        }
    }
    uint8_t *frames = buf->buf;
    const uint16_t *ports = in_port->buf;
    uint8_t *verdicts = verdict->buf;
    uint16_t *outs = out_port->buf;
    const Py_buffer *ev = &self->batch_views[5];
    if (self->batch_views[9].shape[0] < 2) {
        PyErr_SetString(PyExc_ValueError, "batch.emit_n must hold (frames, bytes)");
        goto done;
    }
    struct pylvs_emit em = {
        .buf = ev->buf,
        .cap = ev->shape[0] > UINT32_MAX ? UINT32_MAX : (uint32_t)ev->shape[0],
        .used = 0,
        .n = 0,
        .off = self->batch_views[6].buf,
        .len = self->batch_views[7].buf,
        .port = self->batch_views[8].buf,
    };
    Py_ssize_t emax = self->batch_views[6].shape[0];
    if (self->batch_views[7].shape[0] < emax)
        emax = self->batch_views[7].shape[0];
    if (self->batch_views[8].shape[0] < emax)
        emax = self->batch_views[8].shape[0];
    em.max = emax > UINT32_MAX ? UINT32_MAX : (uint32_t)emax;
    uint32_t *emit_n = self->batch_views[9].buf;
    long tx = engine_batch(self, frames, slot, lens, ports, verdicts, outs, count, now, &em);
    emit_n[0] = em.n;
    emit_n[1] = em.used;
    result = PyLong_FromLong(tx);
done:
    for (int k = 0; k < N_BATCH_ARRAYS; k++)
        Py_XDECREF(arrays[k]);
    return result;
}

static PyObject *engine_expire(PylvsEngine *self, PyObject *args)
{
    double now;
    long budget;
    if (!PyArg_ParseTuple(args, "dl:expire", &now, &budget))
        return NULL;
    if (refuse_if_busy(self) < 0)
        return NULL;
    return PyLong_FromLong(pylvs_engine_expire(self, now, budget));
}

/* The conns of slots [*slot, high) as tuples, at most `count` of them
 * (count < 0: all); *slot is left at the next slot to look at. */
static PyObject *conn_tuples(PylvsEngine *self, uint32_t *slot, long count)
{
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return NULL;
    uint32_t i = *slot;
    for (; i < self->high && (count < 0 || PyList_GET_SIZE(list) < count); i++) {
        const struct conn *c = &self->conns[i];
        if (!c->used)
            continue;
        int tpl = (c->flags & CONN_F_TEMPLATE) != 0;
        PyObject *t = Py_BuildValue("(BkHkHkHBdIII)", (uint8_t)(c->proto & ~TPL_PROTO),
                                    (unsigned long)c->caddr, c->cport,
                                    (unsigned long)c->vaddr, c->vport,
                                    (unsigned long)c->daddr, c->dport, c->state, c->expires,
                                    (unsigned int)c->fwd | (tpl ? CONN_F_TEMPLATE_TUPLE : 0u),
                                    (unsigned int)c->dest, (unsigned int)c->svc);
        if (t == NULL || PyList_Append(list, t) < 0) {
            Py_XDECREF(t);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(t);
    }
    *slot = i;
    return list;
}

static PyObject *engine_conns(PylvsEngine *self, PyObject *unused)
{
    (void)unused;
    uint32_t slot = 0;
    return conn_tuples(self, &slot, -1);
}

/* conns_chunk(start, count): a listing in pieces, so that the engine's lock
 * (which the frame loop needs) is held for one piece at a time. */
static PyObject *engine_conns_chunk(PylvsEngine *self, PyObject *args)
{
    unsigned long start;
    long count;
    if (!PyArg_ParseTuple(args, "kl:conns_chunk", &start, &count))
        return NULL;
    if (count < 1) {
        PyErr_SetString(PyExc_ValueError, "conns_chunk: count must be at least 1");
        return NULL;
    }
    uint32_t slot = start < self->high ? (uint32_t)start : self->high;
    PyObject *list = conn_tuples(self, &slot, count);
    if (list == NULL)
        return NULL;
    return Py_BuildValue("(Nl)", list, slot < self->high ? (long)slot : -1L);
}

/* The conn-index hash of a tuple, for tests that check the two-word fast
 * path against the generic SipHash. */
static PyObject *engine_key_hash(PylvsEngine *self, PyObject *args)
{
    unsigned int proto, p1, p2;
    unsigned long a1, a2;
    if (!PyArg_ParseTuple(args, "IkIkI:_key_hash", &proto, &a1, &p1, &a2, &p2))
        return NULL;
    return PyLong_FromUnsignedLongLong(key_hash(self, (uint8_t)proto, (uint32_t)a1,
                                                (uint16_t)p1, (uint32_t)a2, (uint16_t)p2));
}

/* _check(): verify the index against the slab (for tests). */
static PyObject *engine_check_index(PylvsEngine *self, PyObject *unused)
{
    (void)unused;
    if (conn_table_check(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *engine_get_conn_count(PylvsEngine *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLong(self->conn_count);
}

static PyObject *engine_get_pressure(PylvsEngine *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->pressure);
}

/* One int a backend's frame loop also writes between frames: no lock. */
static int engine_set_pressure(PylvsEngine *self, PyObject *value, void *closure)
{
    (void)closure;
    int on = value == NULL ? -1 : PyObject_IsTrue(value);
    if (on < 0) {
        if (value == NULL)
            PyErr_SetString(PyExc_AttributeError, "pressure cannot be deleted");
        return -1;
    }
    pylvs_engine_set_pressure(self, on);
    return 0;
}

static PyObject *engine_get_upcall_cost(PylvsEngine *self, void *closure)
{
    (void)closure;
    return PyFloat_FromDouble(self->upcall_cost);
}

static int engine_set_upcall_cost(PylvsEngine *self, PyObject *value, void *closure)
{
    (void)closure;
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "upcall_cost cannot be deleted");
        return -1;
    }
    double v = PyFloat_AsDouble(value);
    if (v == -1.0 && PyErr_Occurred())
        return -1;
    if (!(v >= 0.0 && v <= 1.0)) {
        PyErr_SetString(PyExc_ValueError, "upcall_cost must be 0..1 seconds");
        return -1;
    }
    self->upcall_cost = v;
    return 0;
}

static PyObject *engine_get_capacity(PylvsEngine *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLong(self->capacity);
}

static PyObject *engine_get_memory(PylvsEngine *self, void *closure)
{
    (void)closure;
    return PyLong_FromSize_t(conn_table_memory(self));
}

LOCKED(engine_set_tables)
LOCKED(engine_set_sched)
LOCKED(engine_set_ports)
LOCKED(engine_set_routes)
LOCKED(engine_set_sysctls)
LOCKED(engine_set_timeouts)
LOCKED(engine_set_transitions)
LOCKED(engine_set_drop_rate)
LOCKED(engine_drop_entries)
LOCKED(engine_expire_nodest)
LOCKED(engine_process)
LOCKED(engine_expire)
LOCKED_READ(engine_conns)
LOCKED_READ(engine_conns_chunk)
LOCKED(engine_check_index)
LOCKED(pylvs_sync_set_master)
LOCKED(pylvs_sync_drain)
LOCKED(pylvs_sync_install)
LOCKED_READ(pylvs_sync_chunk)

static PyMethodDef engine_methods[] = {
    {"set_tables", (PyCFunction)engine_set_tables_locked, METH_VARARGS,
     "set_tables(services, dests): use these SERVICE_DTYPE / DEST_DTYPE arrays from now on."},
    {"set_sched", (PyCFunction)engine_set_sched_locked, METH_VARARGS,
     "set_sched(sched_svcs, sched_dests, thresholds, sched_table): the schedulers run in C\n"
     "and the dests' -x/-y (tables.SCHED_SVC_DTYPE, SCHED_DEST_DTYPE, DEST_THRESH_DTYPE,\n"
     "int32 sh/dh/mh buckets holding indices into their service's dests, -1 empty)."},
    {"set_ports", (PyCFunction)engine_set_ports_locked, METH_O,
     "set_ports(ports): the I/O ports' facts (tables.PORT_DTYPE, index = port)"},
    {"set_routes", (PyCFunction)engine_set_routes_locked, METH_VARARGS,
     "set_routes(routes, local): ROUTE_DTYPE (longest prefix first), uint32 ascending"},
    {"set_sysctls", (PyCFunction)engine_set_sysctls_locked, METH_O,
     "set_sysctls(values): int64[N_SYSCTL] as tables.SYSCTL_NAMES"},
    {"set_timeouts", (PyCFunction)engine_set_timeouts_locked, METH_O,
     "set_timeouts(timeouts): float64[12] seconds per state (UDP last)."},
    {"set_transitions", (PyCFunction)engine_set_transitions_locked, METH_O,
     "set_transitions(t): uint8[3, 4, 11], the TCP state table (states.TRANSITIONS or\n"
     "TRANSITIONS_DOS while secure_tcp is on)."},
    {"set_drop_rate", (PyCFunction)engine_set_drop_rate_locked, METH_VARARGS,
     "set_drop_rate(rate, counter=-1): drop_packet drops 1 in rate new-flow packets (0: none);\n"
     "counter >= 0 restarts the countdown (the kernel's drop_counter)."},
    {"expire_nodest", (PyCFunction)engine_expire_nodest_locked, METH_NOARGS,
     "expire_nodest() -> int: expire every conn whose dest is gone (expire_nodest_conn's\n"
     "flush after a dest is deleted)."},
    {"drop_entries", (PyCFunction)engine_drop_entries_locked, METH_VARARGS,
     "drop_entries(now) -> int: drop_entry's random scan of 1/32 of the table (conns_dropped)."},
    {"process", (PyCFunction)engine_process_locked, METH_VARARGS,
     "process(batch, now) -> int: handle batch.count frames in place; returns the V_TX count."},
    {"expire", (PyCFunction)engine_expire_locked, METH_VARARGS,
     "expire(now, budget) -> int: advance the clock hand budget slots, removing dead conns."},
    {"conns", (PyCFunction)engine_conns_locked, METH_NOARGS,
     "conns() -> list of (proto, caddr, cport, vaddr, vport, daddr, dport, state, expires,\n"
     "fwd, dest_slot, svc_slot), in slab order."},
    {"conns_chunk", (PyCFunction)engine_conns_chunk_locked, METH_VARARGS,
     "conns_chunk(start, count) -> (list, next): as conns(), from slot start, at most count\n"
     "conns; next is the slot to go on from, -1 at the end. The lock is held for one chunk."},
    {"set_sync_master", (PyCFunction)pylvs_sync_set_master_locked, METH_O,
     "set_sync_master(on): queue conns for sync as the kernel's master (docs/engine.md, Sync)"},
    {"sync_drain", (PyCFunction)pylvs_sync_drain_locked, METH_O,
     "sync_drain(out: SYNC_DTYPE[n]) -> int: move up to n queued records into out"},
    {"sync_install", (PyCFunction)pylvs_sync_install_locked, METH_VARARGS,
     "sync_install(records: SYNC_DTYPE[n], now) -> int: create or update conns (backup)"},
    {"sync_chunk", (PyCFunction)pylvs_sync_chunk_locked, METH_VARARGS,
     "sync_chunk(start, out: SYNC_DTYPE[n]) -> (filled, next): the table as records"},
    {"_key_hash", (PyCFunction)engine_key_hash, METH_VARARGS, NULL},
    {"_check", (PyCFunction)engine_check_index_locked, METH_NOARGS, NULL},
    {NULL},
};

static PyGetSetDef engine_getset[] = {
    {"conn_count", (getter)engine_get_conn_count, NULL, "conns in the table", NULL},
    {"capacity", (getter)engine_get_capacity, NULL, "the most conns the table holds", NULL},
    {"memory", (getter)engine_get_memory, NULL,
     "bytes the conn table holds now (slab in use + index); grows with use", NULL},
    {"pressure", (getter)engine_get_pressure, (setter)engine_set_pressure,
     "the receive ring is backed up: upcalls are limited to upcall_share (bool; "
     "the frame loops set it)", NULL},
    {"upcall_cost", (getter)engine_get_upcall_cost, (setter)engine_set_upcall_cost,
     "seconds one scheduler upcall takes, as control measured it (0: unknown, no limit)", NULL},
    {NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pylvs._fast.Engine",
    .tp_doc = "Engine(capacity, *, key, transitions, timeouts, counters, schedule)\n\n"
              "The pylvs data path: conn table, NAT rewrite, checksums (docs/engine.md).",
    .tp_basicsize = sizeof(PylvsEngine),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = engine_new,
    .tp_dealloc = (destructor)engine_dealloc,
    .tp_traverse = (traverseproc)engine_traverse,
    .tp_clear = (inquiry)engine_clear,
    .tp_methods = engine_methods,
    .tp_getset = engine_getset,
};

/* _siphash(key, data, c=1, d=3): the generic SipHash-c-d, for test vectors. */
static PyObject *fast_siphash(PyObject *mod, PyObject *args)
{
    (void)mod;
    Py_buffer key, data;
    int c = 1, d = 3;
    if (!PyArg_ParseTuple(args, "y*y*|ii:_siphash", &key, &data, &c, &d))
        return NULL;
    PyObject *r = NULL;
    if (key.len != 16)
        PyErr_SetString(PyExc_ValueError, "key must be 16 bytes");
    else if (c < 1 || c > 8 || d < 1 || d > 8)
        PyErr_SetString(PyExc_ValueError, "rounds must be 1..8");
    else
        r = PyLong_FromUnsignedLongLong(pylvs_siphash(pylvs_le64(key.buf),
                                                      pylvs_le64((uint8_t *)key.buf + 8),
                                                      data.buf, (size_t)data.len, c, d));
    PyBuffer_Release(&key);
    PyBuffer_Release(&data);
    return r;
}

static PyMethodDef fast_functions[] = {
    {"_siphash", fast_siphash, METH_VARARGS, "_siphash(key, data, c=1, d=3) -> int"},
    {NULL},
};

int pylvs_engine_register(PyObject *module)
{
    if (PyType_Ready(&EngineType) < 0)
        return -1;
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(module, "Engine", (PyObject *)&EngineType) < 0) {
        Py_DECREF(&EngineType);
        return -1;
    }
    if (PyModule_AddIntConstant(module, "ENGINE_MAX_CAPACITY", MAX_CAPACITY) < 0)
        return -1;
    return PyModule_AddFunctions(module, fast_functions);
}
