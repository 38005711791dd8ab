/* AF_XDP forwarder: one XSK per (interface, rx queue), its UMEM, its four
 * rings, the engine run on frames in the UMEM, V_TX and emitted frames out
 * of the egress port's TX ring (pylvs run --io xdp; pylvs/io/xdp.py).
 *
 * Only linux/if_xdp.h and system calls: no libbpf or libxdp here (the XDP
 * program and the XSKMAP entry are pylvs._bpf's business, in Python).
 *
 * The UMEM: `nframes` chunks of `frame_size` bytes (aligned mode), all in
 * one pool per socket: a stack of free chunk addresses. Chunks go from the
 * stack to the fill ring; the kernel writes a received frame into one and
 * hands it back on the RX ring; after the engine ran, a chunk goes back to
 * the stack, or, for a frame that leaves by the port it came in on, straight
 * onto the TX ring (no copy); a frame for another port, or one the engine
 * made, is copied into a chunk of that port's pool. The completion ring
 * returns sent chunks to their stack. The fill ring is topped up from the
 * stack, keeping TX_RESERVE chunks back for transmission.
 *
 * The engine's frames start with a 10-byte virtio_net_hdr: the kernel
 * leaves XDP_PACKET_HEADROOM (256 bytes) before the data of every chunk,
 * so the header is written, zeroed, just before the received frame (no
 * checksum or GSO state comes with an XDP frame). The header is left out
 * when the frame goes on a TX ring.
 *
 * need_wakeup is on: the kernel sets XDP_RING_NEED_WAKEUP on the fill ring
 * when it wants a poll()/recvfrom() to go on receiving, on the TX ring when
 * it wants a sendto() to start sending (always, in copy mode).
 */
#include "engine.h"
#include "ip_vs_icmp.h"  /* struct pylvs_emit */
#include "structmember.h"

#include <errno.h>
#include <linux/if_xdp.h>
#include <poll.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef AF_XDP
#define AF_XDP 44
#endif
#ifndef SOL_XDP
#define SOL_XDP 283
#endif

#define XMAX_PORTS 64
#define XDP_PACKET_HEADROOM 256  /* include/linux/bpf.h (not in the UAPI headers) */
#define TX_RESERVE 512u     /* chunks the fill ring never takes */
#define EMIT_BYTES (256u << 10)
#define EMIT_FRAMES 1024u
#define EMIT_ROOM_BYTES (96u << 10)
#define EMIT_ROOM_FRAMES 64u

struct xring {
    uint32_t *producer, *consumer, *flags;
    void *desc;
    uint32_t size, mask;
    uint32_t head;         /* our producer (fill, tx) or consumer (rx, comp) index */
    void *map;
    size_t map_len;
};

typedef struct {
    PyObject_HEAD
    int fd;
    unsigned ifindex, queue;
    int zerocopy;
    uint8_t *umem;
    size_t umem_len;
    unsigned frame_size, nframes;
    uint64_t *free_stack;
    unsigned nfree;
    struct xring rx, tx, fill, comp;
    unsigned tx_pending;   /* descriptors put on the TX ring since the last kick */
    struct pylvs_emit em;  /* this worker's emit area (the first socket's is used) */
    unsigned long long rx_frames, rx_no_headroom, rx_oversize, tx_frames, tx_copied, tx_no_room, tx_bad_port,
        emit_sent, emit_no_room, tx_kicks, tx_kick_errors, polls, poll_timeouts, fwd_calls,
        fwd_budget_cuts;
    int last_tx_error;
    int busy;
} XskObject;

static PyTypeObject XskType;

static int ring_map(int fd, struct xring *r, const struct xdp_ring_offset *off, uint32_t size,
                    size_t desc_size, off_t pgoff)
{
    r->map_len = off->desc + (size_t)size * desc_size;
    r->map = mmap(NULL, r->map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, pgoff);
    if (r->map == MAP_FAILED) {
        r->map = NULL;
        return -1;
    }
    uint8_t *base = r->map;
    r->producer = (uint32_t *)(base + off->producer);
    r->consumer = (uint32_t *)(base + off->consumer);
    r->flags = (uint32_t *)(base + off->flags);
    r->desc = base + off->desc;
    r->size = size;
    r->mask = size - 1;
    return 0;
}

/* Entries waiting for us on a ring the kernel produces (rx, comp). */
static inline uint32_t ring_ready(struct xring *r)
{
    return __atomic_load_n(r->producer, __ATOMIC_ACQUIRE) - r->head;
}

static inline void ring_consumed(struct xring *r, uint32_t n)
{
    r->head += n;
    __atomic_store_n(r->consumer, r->head, __ATOMIC_RELEASE);
}

/* Free slots on a ring we produce (fill, tx). */
static inline uint32_t ring_room(struct xring *r)
{
    return r->size - (r->head - __atomic_load_n(r->consumer, __ATOMIC_ACQUIRE));
}

static inline void ring_produced(struct xring *r, uint32_t n)
{
    r->head += n;
    __atomic_store_n(r->producer, r->head, __ATOMIC_RELEASE);
}

static inline int need_wakeup(struct xring *r)
{
    return __atomic_load_n(r->flags, __ATOMIC_RELAXED) & XDP_RING_NEED_WAKEUP;
}

static inline uint64_t chunk_of(XskObject *x, uint64_t addr)
{
    return addr - addr % x->frame_size;
}

static void fill_refill(XskObject *x)
{
    uint32_t room = ring_room(&x->fill);
    uint32_t n = x->nfree > TX_RESERVE ? x->nfree - TX_RESERVE : 0;
    if (n > room)
        n = room;
    uint64_t *d = x->fill.desc;
    for (uint32_t i = 0; i < n; i++)
        d[(x->fill.head + i) & x->fill.mask] = x->free_stack[--x->nfree];
    if (n)
        ring_produced(&x->fill, n);
}

static void comp_reap(XskObject *x)
{
    uint32_t n = ring_ready(&x->comp);
    uint64_t *d = x->comp.desc;
    for (uint32_t i = 0; i < n; i++)
        x->free_stack[x->nfree++] = chunk_of(x, d[(x->comp.head + i) & x->comp.mask]);
    if (n)
        ring_consumed(&x->comp, n);
}

static void tx_kick(XskObject *x)
{
    if (!x->tx_pending)
        return;
    x->tx_pending = 0;
    if (!need_wakeup(&x->tx))
        return;
    x->tx_kicks++;
    if (sendto(x->fd, NULL, 0, MSG_DONTWAIT, NULL, 0) < 0 && errno != EAGAIN && errno != EBUSY
        && errno != ENOBUFS && errno != ENETDOWN) {
        x->tx_kick_errors++;
        x->last_tx_error = errno;
    }
}

/* Put chunk `addr` (data at addr, `len` bytes, no vnet header) on the TX
 * ring; 0 when the ring is full (the caller keeps the chunk). */
static int tx_post(XskObject *x, uint64_t addr, uint32_t len)
{
    if (!ring_room(&x->tx)) {
        tx_kick(x);
        comp_reap(x);
        if (!ring_room(&x->tx))
            return 0;
    }
    struct xdp_desc *d = &((struct xdp_desc *)x->tx.desc)[x->tx.head & x->tx.mask];
    d->addr = addr;
    d->len = len;
    d->options = 0;
    ring_produced(&x->tx, 1);
    if (++x->tx_pending >= 64)
        tx_kick(x);
    return 1;
}

/* Copy a frame (vnet header first) into a free chunk of x and send it. */
static int tx_copy(XskObject *x, const uint8_t *frame, uint32_t len)
{
    if (len <= PYLVS_VNET_HDR_LEN || len - PYLVS_VNET_HDR_LEN > x->frame_size - XDP_PACKET_HEADROOM)
        return 0;
    if (!x->nfree)
        comp_reap(x);
    if (!x->nfree)
        return 0;
    uint64_t chunk = x->free_stack[--x->nfree];
    uint64_t addr = chunk + XDP_PACKET_HEADROOM;
    memcpy(x->umem + addr, frame + PYLVS_VNET_HDR_LEN, len - PYLVS_VNET_HDR_LEN);
    if (tx_post(x, addr, len - PYLVS_VNET_HDR_LEN))
        return 1;
    x->free_stack[x->nfree++] = chunk;
    return 0;
}

static void xsk_free(XskObject *x)
{
    struct xring *rings[4] = {&x->rx, &x->tx, &x->fill, &x->comp};
    for (int i = 0; i < 4; i++)
        if (rings[i]->map) {
            munmap(rings[i]->map, rings[i]->map_len);
            rings[i]->map = NULL;
        }
    if (x->fd >= 0) {
        close(x->fd);
        x->fd = -1;
    }
    if (x->umem) {
        munmap(x->umem, x->umem_len);
        x->umem = NULL;
    }
    PyMem_Free(x->free_stack);
    x->free_stack = NULL;
    PyMem_Free(x->em.buf);
    PyMem_Free(x->em.off);
    PyMem_Free(x->em.len);
    PyMem_Free(x->em.port);
    memset(&x->em, 0, sizeof x->em);
}

static int set_ring(int fd, int opt, unsigned size)
{
    return setsockopt(fd, SOL_XDP, opt, &size, sizeof size);
}

static int xsk_init(XskObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"ifindex", "queue", "nframes", "frame_size", "ring_size",
                             "zerocopy", NULL};
    unsigned ifindex, queue = 0, nframes = 8192, frame_size = 4096, ring_size = 2048;
    int zerocopy = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "I|IIIIp", kwlist, &ifindex, &queue, &nframes,
                                     &frame_size, &ring_size, &zerocopy))
        return -1;
    if (self->umem || self->fd > 0) {
        PyErr_SetString(PyExc_RuntimeError, "Xsk already initialised");
        return -1;
    }
    if (frame_size < 2048 || frame_size & (frame_size - 1) || ring_size < 64
        || ring_size & (ring_size - 1) || nframes < 2 * ring_size + TX_RESERVE) {
        PyErr_SetString(PyExc_ValueError, "frame_size and ring_size must be powers of two "
                        "(frame_size >= 2048, ring_size >= 64), nframes >= 2 * ring_size + 512");
        return -1;
    }
    self->fd = -1;
    self->ifindex = ifindex;
    self->queue = queue;
    self->frame_size = frame_size;
    self->nframes = nframes;
    const char *what = "creating the AF_XDP socket";
    self->fd = socket(AF_XDP, SOCK_RAW | SOCK_CLOEXEC, 0);
    if (self->fd < 0)
        goto fail;
    what = "allocating the UMEM";
    self->umem_len = (size_t)nframes * frame_size;
    self->umem = mmap(NULL, self->umem_len, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (self->umem == MAP_FAILED) {
        self->umem = NULL;
        goto fail;
    }
    self->free_stack = PyMem_Calloc(nframes, sizeof *self->free_stack);
    if (!self->free_stack) {
        errno = ENOMEM;
        goto fail;
    }
    for (unsigned i = 0; i < nframes; i++)
        self->free_stack[self->nfree++] = (uint64_t)(nframes - 1 - i) * frame_size;
    what = "registering the UMEM (XDP_UMEM_REG)";
    struct xdp_umem_reg reg = {.addr = (uint64_t)(uintptr_t)self->umem, .len = self->umem_len,
                               .chunk_size = frame_size, .headroom = 0};
    if (setsockopt(self->fd, SOL_XDP, XDP_UMEM_REG, &reg, sizeof reg) < 0)
        goto fail;
    what = "sizing the AF_XDP rings";
    if (set_ring(self->fd, XDP_UMEM_FILL_RING, ring_size) < 0
        || set_ring(self->fd, XDP_UMEM_COMPLETION_RING, ring_size) < 0
        || set_ring(self->fd, XDP_RX_RING, ring_size) < 0
        || set_ring(self->fd, XDP_TX_RING, ring_size) < 0)
        goto fail;
    what = "mapping the AF_XDP rings";
    struct xdp_mmap_offsets off;
    socklen_t olen = sizeof off;
    if (getsockopt(self->fd, SOL_XDP, XDP_MMAP_OFFSETS, &off, &olen) < 0)
        goto fail;
    if (ring_map(self->fd, &self->rx, &off.rx, ring_size, sizeof(struct xdp_desc), XDP_PGOFF_RX_RING)
        || ring_map(self->fd, &self->tx, &off.tx, ring_size, sizeof(struct xdp_desc), XDP_PGOFF_TX_RING)
        || ring_map(self->fd, &self->fill, &off.fr, ring_size, sizeof(uint64_t), XDP_UMEM_PGOFF_FILL_RING)
        || ring_map(self->fd, &self->comp, &off.cr, ring_size, sizeof(uint64_t),
                    XDP_UMEM_PGOFF_COMPLETION_RING))
        goto fail;
    self->rx.head = __atomic_load_n(self->rx.consumer, __ATOMIC_ACQUIRE);
    self->comp.head = __atomic_load_n(self->comp.consumer, __ATOMIC_ACQUIRE);
    self->tx.head = __atomic_load_n(self->tx.producer, __ATOMIC_ACQUIRE);
    self->fill.head = __atomic_load_n(self->fill.producer, __ATOMIC_ACQUIRE);
    fill_refill(self);
    /* Zero-copy where the driver offers it, else copy mode. */
    what = "binding the AF_XDP socket";
    struct sockaddr_xdp sxdp = {.sxdp_family = AF_XDP, .sxdp_ifindex = ifindex,
                                .sxdp_queue_id = queue};
    int bound = -1;
    if (zerocopy) {
        sxdp.sxdp_flags = XDP_USE_NEED_WAKEUP | XDP_ZEROCOPY;
        bound = bind(self->fd, (struct sockaddr *)&sxdp, sizeof sxdp);
        self->zerocopy = bound == 0;
    }
    if (bound < 0) {
        sxdp.sxdp_flags = XDP_USE_NEED_WAKEUP | XDP_COPY;
        bound = bind(self->fd, (struct sockaddr *)&sxdp, sizeof sxdp);
    }
    if (bound < 0)
        goto fail;
    return 0;
fail:;
    int err = errno;
    xsk_free(self);
    PyErr_Format(PyExc_OSError, "%s (ifindex %u, queue %u): %s", what, ifindex, queue, strerror(err));
    PyObject *exc = PyErr_Occurred();
    if (exc) {
        /* Keep errno readable as OSError.errno. */
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyObject *msg = value ? PyObject_Str(value) : NULL;
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        PyObject *a = msg ? Py_BuildValue("(iO)", err, msg) : NULL;
        Py_XDECREF(msg);
        if (a) {
            PyErr_SetObject(PyExc_OSError, a);
            Py_DECREF(a);
        }
    }
    return -1;
}

static void xsk_dealloc(XskObject *self)
{
    xsk_free(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *xsk_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    XskObject *self = (XskObject *)type->tp_alloc(type, 0);
    if (self)
        self->fd = -1;
    return (PyObject *)self;
}

static PyObject *xsk_close(XskObject *self, PyObject *unused)
{
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Xsk is in use by xsk_forward");
        return NULL;
    }
    xsk_free(self);
    Py_RETURN_NONE;
}

static PyObject *xsk_statistics(XskObject *self, PyObject *unused)
{
    struct xdp_statistics st;
    socklen_t len = sizeof st;
    memset(&st, 0, sizeof st);
    if (self->fd < 0 || getsockopt(self->fd, SOL_XDP, XDP_STATISTICS, &st, &len) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K}", "rx_dropped", st.rx_dropped,
                         "rx_invalid_descs", st.rx_invalid_descs, "tx_invalid_descs",
                         st.tx_invalid_descs, "rx_ring_full", st.rx_ring_full,
                         "rx_fill_ring_empty_descs", st.rx_fill_ring_empty_descs,
                         "tx_ring_empty_descs", st.tx_ring_empty_descs);
}

static PyMethodDef xsk_methods[] = {
    {"close", (PyCFunction)xsk_close, METH_NOARGS, "Close the socket and free the UMEM."},
    {"statistics", (PyCFunction)xsk_statistics, METH_NOARGS,
     "statistics() -> dict: the kernel's XDP_STATISTICS of this socket (running totals)."},
    {NULL},
};

#define XU64(name) {#name, T_ULONGLONG, offsetof(XskObject, name), READONLY, NULL}
static PyMemberDef xsk_members[] = {
    {"fd", T_INT, offsetof(XskObject, fd), READONLY, "the AF_XDP socket (for the XSKMAP)"},
    {"ifindex", T_UINT, offsetof(XskObject, ifindex), READONLY, NULL},
    {"queue", T_UINT, offsetof(XskObject, queue), READONLY, NULL},
    {"zerocopy", T_INT, offsetof(XskObject, zerocopy), READONLY,
     "1: bound with XDP_ZEROCOPY; 0: copy mode"},
    XU64(rx_frames), XU64(rx_no_headroom), XU64(rx_oversize), XU64(tx_frames), XU64(tx_copied), XU64(tx_no_room),
    XU64(tx_bad_port), XU64(emit_sent), XU64(emit_no_room), XU64(tx_kicks), XU64(tx_kick_errors),
    XU64(polls), XU64(poll_timeouts), XU64(fwd_calls), XU64(fwd_budget_cuts),
    {"last_tx_error", T_INT, offsetof(XskObject, last_tx_error), READONLY, NULL},
    {NULL},
};

static PyTypeObject XskType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pylvs._fast.Xsk",
    .tp_doc = "Xsk(ifindex, queue=0, nframes=8192, frame_size=4096, ring_size=2048, zerocopy=True)\n\n"
              "An AF_XDP socket bound to one rx queue of an interface, with its own UMEM\n"
              "and rings (need_wakeup on; zero-copy when the driver offers it and\n"
              "zerocopy is true, else copy mode). OSError naming the step that failed.",
    .tp_basicsize = sizeof(XskObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = xsk_new,
    .tp_init = (initproc)xsk_init,
    .tp_dealloc = (destructor)xsk_dealloc,
    .tp_methods = xsk_methods,
    .tp_members = xsk_members,
};

/* --- forward -------------------------------------------------------------- */

static int get_xsks(PyObject *seq, XskObject **x, PyObject **fast)
{
    *fast = PySequence_Fast(seq, "xsks must be a sequence of Xsk");
    if (!*fast)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(*fast);
    if (n < 1 || n > XMAX_PORTS) {
        PyErr_Format(PyExc_ValueError, "between 1 and %d Xsk", XMAX_PORTS);
        Py_CLEAR(*fast);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o = PySequence_Fast_GET_ITEM(*fast, i);
        if (!PyObject_TypeCheck(o, &XskType) || ((XskObject *)o)->fd < 0 || ((XskObject *)o)->busy) {
            PyErr_SetString(PyExc_TypeError, "xsks must be open Xsk objects not in use");
            Py_CLEAR(*fast);
            return -1;
        }
        x[i] = (XskObject *)o;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        x[i]->busy = 1;
    return (int)n;
}

static int emit_alloc(struct pylvs_emit *em)
{
    if (em->buf)
        return 0;
    em->buf = PyMem_Malloc(EMIT_BYTES);
    em->off = PyMem_Calloc(EMIT_FRAMES, sizeof *em->off);
    em->len = PyMem_Calloc(EMIT_FRAMES, sizeof *em->len);
    em->port = PyMem_Calloc(EMIT_FRAMES, sizeof *em->port);
    if (!em->buf || !em->off || !em->len || !em->port) {
        PyMem_Free(em->buf);
        PyMem_Free(em->off);
        PyMem_Free(em->len);
        PyMem_Free(em->port);
        memset(em, 0, sizeof *em);
        PyErr_NoMemory();
        return -1;
    }
    em->cap = EMIT_BYTES;
    em->max = EMIT_FRAMES;
    return 0;
}

/* Emitted frames are copied out at once: the area is reset per frame. */
static void emit_out(XskObject **x, int n, struct pylvs_emit *em)
{
    for (uint32_t k = 0; k < em->n; k++) {
        uint16_t o = em->port[k];
        if (o >= n) {
            x[0]->tx_bad_port++;
            continue;
        }
        if (tx_copy(x[o], em->buf + em->off[k], em->len[k]))
            x[o]->emit_sent++;
        else
            x[o]->emit_no_room++;
    }
    em->n = em->used = 0;
}

static double wait_rx(XskObject **x, int n, int timeout_ms)
{
    for (int i = 0; i < n; i++)
        if (ring_ready(&x[i]->rx))
            return 0.0;
    if (timeout_ms == 0)
        return 0.0;
    struct pollfd pfd[XMAX_PORTS];
    for (int i = 0; i < n; i++)
        pfd[i] = (struct pollfd){.fd = x[i]->fd, .events = POLLIN};
    struct timespec t0, t1;
    int pr;
    x[0]->polls++;
    Py_BEGIN_ALLOW_THREADS
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pr = poll(pfd, n, timeout_ms);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    Py_END_ALLOW_THREADS
    if (pr == 0)
        x[0]->poll_timeouts++;
    return (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
}

static PyObject *xsk_forward(PyObject *mod, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"engine", "xsks", "now", "timeout_ms", "budget", NULL};
    PyObject *engine, *seq;
    double now;
    int timeout_ms = 0;
    long budget = 4096;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOd|il", kwlist, &engine, &seq, &now,
                                     &timeout_ms, &budget))
        return NULL;
    if (!pylvs_engine_check(engine)) {
        PyErr_SetString(PyExc_TypeError, "xsk_forward() needs a pylvs._fast.Engine");
        return NULL;
    }
    XskObject *x[XMAX_PORTS];
    PyObject *fast;
    int n = get_xsks(seq, x, &fast);
    if (n < 0)
        return NULL;
    struct pylvs_emit *em = &x[0]->em;
    if (emit_alloc(em) < 0) {
        for (int i = 0; i < n; i++)
            x[i]->busy = 0;
        Py_DECREF(fast);
        return NULL;
    }
    for (int p = 0; p < n; p++) {
        comp_reap(x[p]);
        fill_refill(x[p]);
        /* The kernel stopped taking from the fill ring while it was empty. */
        if (need_wakeup(&x[p]->fill))
            recvfrom(x[p]->fd, NULL, 0, MSG_DONTWAIT, NULL, NULL);
    }
    now += wait_rx(x, n, timeout_ms);
    PylvsEngine *e = (PylvsEngine *)engine;
    em->n = em->used = 0;
    long seen = 0;
    int progress = 1;
    while (progress && seen < budget) {
        progress = 0;
        for (int p = 0; p < n && seen < budget; p++) {
            XskObject *r = x[p];
            uint32_t avail = ring_ready(&r->rx);
            if (avail > 64)
                avail = 64;  /* a slice per port per round: no port starves the others */
            if (!avail)
                continue;
            progress = 1;
            struct xdp_desc *descs = r->rx.desc;
            for (uint32_t i = 0; i < avail; i++) {
                struct xdp_desc d = descs[(r->rx.head + i) & r->rx.mask];
                uint64_t chunk = chunk_of(r, d.addr);
                r->rx_frames++;
                seen++;
                if (d.addr - chunk < PYLVS_VNET_HDR_LEN) {
                    r->rx_no_headroom++;
                    r->free_stack[r->nfree++] = chunk;
                    continue;
                }
                uint8_t *frame = r->umem + d.addr - PYLVS_VNET_HDR_LEN;
                memset(frame, 0, PYLVS_VNET_HDR_LEN);
                uint16_t out = 0;
                int v = pylvs_engine_frame(e, frame, d.len + PYLVS_VNET_HDR_LEN, (uint16_t)p, now,
                                           &out, em);
                int kept = 0;
                if (v == PYLVS_V_TX) {
                    if (out >= n) {
                        r->tx_bad_port++;
                    } else if (out == p) {
                        kept = tx_post(r, d.addr, d.len);
                        if (kept)
                            r->tx_frames++;
                        else
                            r->tx_no_room++;
                    } else if (tx_copy(x[out], frame, d.len + PYLVS_VNET_HDR_LEN)) {
                        x[out]->tx_frames++;
                        x[out]->tx_copied++;
                    } else {
                        x[out]->tx_no_room++;
                    }
                }
                if (!kept)
                    r->free_stack[r->nfree++] = chunk;
                if (em->n)
                    emit_out(x, n, em);
            }
            ring_consumed(&r->rx, avail);
            fill_refill(r);
        }
    }
    for (int p = 0; p < n; p++) {
        tx_kick(x[p]);
        x[p]->busy = 0;
    }
    x[0]->fwd_calls++;
    if (seen >= budget)
        x[0]->fwd_budget_cuts++;
    Py_DECREF(fast);
    return PyLong_FromLong(seen);
}

/* --- recv / send: copies, for engines that take a Batch ------------------- */

/* A writable C-contiguous view with this item size and dimensions. */
static int get_view(PyObject *o, Py_buffer *v, Py_ssize_t itemsize, int ndim, const char *what)
{
    if (PyObject_GetBuffer(o, v, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return -1;
    if (v->itemsize != itemsize || v->ndim != ndim) {
        PyBuffer_Release(v);
        PyErr_Format(PyExc_ValueError, "%s: wrong item size or dimensions", what);
        return -1;
    }
    return 0;
}

static void put_xsks(XskObject **x, int n, PyObject *fast)
{
    for (int i = 0; i < n; i++)
        x[i]->busy = 0;
    Py_DECREF(fast);
}

static PyObject *xsk_recv(PyObject *mod, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"xsks", "buf", "length", "in_port", "timeout_ms", NULL};
    PyObject *seq, *obuf, *olen, *oport;
    int timeout_ms = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOO|i", kwlist, &seq, &obuf, &olen, &oport,
                                     &timeout_ms))
        return NULL;
    XskObject *x[XMAX_PORTS];
    PyObject *fast;
    int n = get_xsks(seq, x, &fast);
    if (n < 0)
        return NULL;
    Py_buffer vb, vl, vp;
    if (get_view(obuf, &vb, 1, 2, "buf") < 0) {
        put_xsks(x, n, fast);
        return NULL;
    }
    if (get_view(olen, &vl, 4, 1, "length") < 0) {
        PyBuffer_Release(&vb);
        put_xsks(x, n, fast);
        return NULL;
    }
    if (get_view(oport, &vp, 2, 1, "in_port") < 0) {
        PyBuffer_Release(&vb);
        PyBuffer_Release(&vl);
        put_xsks(x, n, fast);
        return NULL;
    }
    Py_ssize_t rows = vb.shape[0], slot = vb.shape[1], got = 0;
    if (vl.shape[0] < rows)
        rows = vl.shape[0];
    if (vp.shape[0] < rows)
        rows = vp.shape[0];
    uint8_t *out = vb.buf;
    uint32_t *lens = vl.buf;
    uint16_t *ports = vp.buf;
    for (int p = 0; p < n; p++) {
        comp_reap(x[p]);
        fill_refill(x[p]);
    }
    if (rows > 0)
        wait_rx(x, n, timeout_ms);
    for (int p = 0; p < n && got < rows; p++) {
        XskObject *r = x[p];
        uint32_t avail = ring_ready(&r->rx), i;
        struct xdp_desc *descs = r->rx.desc;
        for (i = 0; i < avail && got < rows; i++) {
            struct xdp_desc d = descs[(r->rx.head + i) & r->rx.mask];
            r->rx_frames++;
            if (d.len + PYLVS_VNET_HDR_LEN > (uint64_t)slot) {
                r->rx_oversize++;
            } else {
                uint8_t *row = out + got * slot;
                memset(row, 0, PYLVS_VNET_HDR_LEN);
                memcpy(row + PYLVS_VNET_HDR_LEN, r->umem + d.addr, d.len);
                lens[got] = d.len + PYLVS_VNET_HDR_LEN;
                ports[got] = (uint16_t)p;
                got++;
            }
            r->free_stack[r->nfree++] = chunk_of(r, d.addr);
        }
        if (i)
            ring_consumed(&r->rx, i);
        fill_refill(r);
    }
    PyBuffer_Release(&vb);
    PyBuffer_Release(&vl);
    PyBuffer_Release(&vp);
    put_xsks(x, n, fast);
    return PyLong_FromSsize_t(got);
}

static unsigned long long xsk_sent(XskObject **x, int n)
{
    unsigned long long t = 0;
    for (int p = 0; p < n; p++)
        t += x[p]->tx_frames + x[p]->emit_sent;
    return t;
}

static PyObject *xsk_send(PyObject *mod, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"xsks", "buf", "length", "verdict", "out_port", "count", NULL};
    PyObject *seq, *obuf, *olen, *overd, *oport;
    Py_ssize_t count;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOn", kwlist, &seq, &obuf, &olen, &overd,
                                     &oport, &count))
        return NULL;
    XskObject *x[XMAX_PORTS];
    PyObject *fast;
    int n = get_xsks(seq, x, &fast);
    if (n < 0)
        return NULL;
    Py_buffer v[4];
    const struct { PyObject *o; Py_ssize_t size; int ndim; const char *what; } spec[4] = {
        {obuf, 1, 2, "buf"}, {olen, 4, 1, "length"}, {overd, 1, 1, "verdict"},
        {oport, 2, 1, "out_port"}};
    for (int i = 0; i < 4; i++) {
        if (get_view(spec[i].o, &v[i], spec[i].size, spec[i].ndim, spec[i].what) < 0) {
            while (i--)
                PyBuffer_Release(&v[i]);
            put_xsks(x, n, fast);
            return NULL;
        }
        if (count > v[i].shape[0])
            count = v[i].shape[0];
    }
    Py_ssize_t slot = v[0].shape[1];
    uint8_t *buf = v[0].buf, *verd = v[2].buf;
    uint32_t *lens = v[1].buf;
    uint16_t *outp = v[3].buf;
    unsigned long long before = xsk_sent(x, n);
    for (Py_ssize_t i = 0; i < count; i++) {
        if (verd[i] != PYLVS_V_TX)
            continue;
        uint16_t o = outp[i];
        if (o >= n || lens[i] > slot)
            x[0]->tx_bad_port++;
        else if (tx_copy(x[o], buf + i * slot, lens[i]))
            x[o]->tx_frames++;
        else
            x[o]->tx_no_room++;
    }
    for (int p = 0; p < n; p++)
        tx_kick(x[p]);
    unsigned long long after = xsk_sent(x, n);
    for (int i = 0; i < 4; i++)
        PyBuffer_Release(&v[i]);
    put_xsks(x, n, fast);
    return PyLong_FromUnsignedLongLong(after - before);
}

static PyObject *xsk_emit_send(PyObject *mod, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"xsks", "emit_buf", "emit_off", "emit_len", "emit_port", "emit_n", NULL};
    PyObject *seq, *o[5];
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOO", kwlist, &seq, &o[0], &o[1], &o[2],
                                     &o[3], &o[4]))
        return NULL;
    XskObject *x[XMAX_PORTS];
    PyObject *fast;
    int n = get_xsks(seq, x, &fast);
    if (n < 0)
        return NULL;
    static const Py_ssize_t sizes[5] = {1, 4, 4, 2, 4};
    static const char *what[5] = {"emit_buf", "emit_off", "emit_len", "emit_port", "emit_n"};
    Py_buffer v[5];
    for (int i = 0; i < 5; i++)
        if (get_view(o[i], &v[i], sizes[i], 1, what[i]) < 0) {
            while (i--)
                PyBuffer_Release(&v[i]);
            put_xsks(x, n, fast);
            return NULL;
        }
    unsigned long long before = xsk_sent(x, n);
    if (v[4].shape[0] >= 1 && v[0].shape[0] <= UINT32_MAX) {
        uint32_t frames = ((uint32_t *)v[4].buf)[0], cap = (uint32_t)v[0].shape[0];
        for (int i = 1; i < 4; i++)
            if (frames > v[i].shape[0])
                frames = (uint32_t)v[i].shape[0];
        uint32_t *off = v[1].buf, *len = v[2].buf;
        uint16_t *port = v[3].buf;
        for (uint32_t k = 0; k < frames; k++) {
            /* Frames given from Python may lie outside the buffer. */
            if (port[k] >= n || len[k] > cap || off[k] > cap - len[k])
                x[0]->tx_bad_port++;
            else if (tx_copy(x[port[k]], (uint8_t *)v[0].buf + off[k], len[k]))
                x[port[k]]->emit_sent++;
            else
                x[port[k]]->emit_no_room++;
        }
        for (int p = 0; p < n; p++)
            tx_kick(x[p]);
    }
    unsigned long long after = xsk_sent(x, n);
    for (int i = 0; i < 5; i++)
        PyBuffer_Release(&v[i]);
    put_xsks(x, n, fast);
    return PyLong_FromUnsignedLongLong(after - before);
}

static PyMethodDef xsk_functions[] = {
    {"xsk_recv", (PyCFunction)(void (*)(void))xsk_recv, METH_VARARGS | METH_KEYWORDS,
     "xsk_recv(xsks, buf, length, in_port, timeout_ms=0) -> frames copied\n\n"
     "Copy received frames into a Batch's rows, each behind a zeroed vnet header."},
    {"xsk_send", (PyCFunction)(void (*)(void))xsk_send, METH_VARARGS | METH_KEYWORDS,
     "xsk_send(xsks, buf, length, verdict, out_port, count) -> frames sent\n\n"
     "Send a Batch's V_TX rows (vnet header dropped) on their ports' TX rings."},
    {"xsk_emit_send", (PyCFunction)(void (*)(void))xsk_emit_send, METH_VARARGS | METH_KEYWORDS,
     "xsk_emit_send(xsks, emit_buf, emit_off, emit_len, emit_port, emit_n) -> frames sent\n\n"
     "Send the first emit_n[0] frames of a Batch's emit area on their ports' TX rings."},
    {"xsk_forward", (PyCFunction)(void (*)(void))xsk_forward, METH_VARARGS | METH_KEYWORDS,
     "xsk_forward(engine, xsks, now, timeout_ms=0, budget=4096) -> frames seen\n\n"
     "Wait up to timeout_ms for a frame on any XSK (index = engine port), run the\n"
     "engine on each in its UMEM chunk, send V_TX frames and the frames the\n"
     "engine made on the TX ring of their port."},
    {NULL},
};

int pylvs_xdp_register(PyObject *module)
{
    if (PyType_Ready(&XskType) < 0)
        return -1;
    Py_INCREF(&XskType);
    if (PyModule_AddObject(module, "Xsk", (PyObject *)&XskType) < 0) {
        Py_DECREF(&XskType);
        return -1;
    }
    return PyModule_AddFunctions(module, xsk_functions);
}
