/* AF_XDP forwarder: XSKs per (interface, rx queue, worker), one UMEM per
 * interface, the engine run on frames in the UMEM, V_TX and emitted frames
 * out of the egress port's TX ring (pylvs run --io xdp; pylvs/io/xdp.py).
 *
 * Only linux/if_xdp.h and system calls: no libbpf or libxdp here (the XDP
 * program and the XSKMAP entry are pylvs._bpf's business, in Python).
 *
 * The UMEM: `nframes` chunks of `frame_size` bytes (aligned mode). Free
 * chunks sit on stacks: each socket's own (used without a lock) and the
 * pool's, common to the sockets that share the UMEM (under its lock).
 * Every rx queue a UMEM serves has a fill and a completion ring of its own
 * (struct xfq), shared by the sockets bound to that queue (under the
 * queue's lock; taken before the pool's when both are held).
 * Chunks go from the stacks to the fill ring; the kernel writes a received
 * frame into one and hands it back on the RX ring; after the engine ran, a
 * chunk goes back to the socket's stack, or, for a frame that leaves by the
 * port it came in on, straight onto the TX ring (no copy); a frame for
 * another port, or one the engine made, is copied into a chunk of that
 * port's UMEM. The completion ring returns sent chunks. The fill ring is
 * topped up from the stacks, keeping TX_RESERVE chunks back for
 * transmission.
 *
 * A socket's own stack is a cache: whatever it holds above SOCK_KEEP after
 * reaping or filling goes to the pool's stack, and one that runs short
 * takes from there. Without that, a worker with no traffic hoards chunks:
 * it reaps the shared completion ring on every poll timeout (the busy
 * worker's sent chunks) and cannot hand them back while the fill ring is
 * full, until the busy worker has none left to send with.
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
#include "views.h"

#include <errno.h>
#include <linux/if_xdp.h>
#include <poll.h>
#include <pthread.h>
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

#define XMAX_PORTS 64      /* engine ports */
#define XMAX_XSKS 1024     /* sockets in one call: ports x rx queues */
#define XDP_PACKET_HEADROOM 256  /* include/linux/bpf.h (not in the UAPI headers) */
#define TX_RESERVE 512u     /* chunks the fill ring never takes */
#define SOCK_KEEP (2 * TX_RESERVE)  /* most a socket keeps to itself after a locked step */
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

/* The UMEM and the free chunks no socket holds. Freed with its last
 * socket. */
struct xpool {
    uint8_t *umem;
    size_t umem_len;
    unsigned frame_size, nframes;
    uint64_t *free_stack;  /* free chunks no socket holds (under mu) */
    unsigned nfree;
    pthread_mutex_t mu;
    int refs;              /* sockets using it (changed with the GIL held) */
};

/* The fill and completion rings of one (interface, rx queue). The kernel
 * gives one pair to all the sockets bound to the same queue with
 * XDP_SHARED_UMEM, and wants a pair of its own, set up on the socket
 * before bind, for a socket that shares the UMEM from another queue
 * (Documentation/networking/af_xdp.rst, "XDP_SHARED_UMEM bind flag"):
 * each is a single-producer single-consumer ring, so the workers whose
 * sockets share them take `mu` around every use. Freed with its last
 * socket. */
struct xfq {
    struct xring fill, comp;
    pthread_mutex_t mu;
    int refs;              /* sockets using it (changed with the GIL held) */
};

typedef struct {
    PyObject_HEAD
    int fd;
    unsigned ifindex, queue;
    unsigned port;         /* the engine's port number of this interface */
    int zerocopy;
    int shared;            /* bound with XDP_SHARED_UMEM to another socket's UMEM */
    int fq_owner;          /* made its queue's fill and completion rings */
    struct xpool *pool;
    struct xfq *fq;
    uint8_t *umem;         /* pool->umem */
    unsigned frame_size;
    uint64_t *free_stack;  /* this socket's free chunks, no lock (room for all of the pool's) */
    unsigned nfree;
    struct xring rx, tx;
    unsigned tx_pending;   /* descriptors put on the TX ring since the last kick */
    struct pylvs_emit em;  /* this worker's emit area (the first socket's is used) */
    unsigned long long rx_frames, rx_no_headroom, rx_oversize, tx_frames, tx_copied, tx_no_room,
        tx_bad_port, emit_sent, emit_no_room, tx_kicks, tx_kick_errors, polls, poll_timeouts,
        fwd_calls, fwd_budget_cuts;
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

static void ring_unmap(struct xring *r)
{
    if (r->map) {
        munmap(r->map, r->map_len);
        r->map = NULL;
    }
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

/* Move up to `n` chunks from the top of one stack to another. */
static inline unsigned stack_move(uint64_t *to, unsigned *nto, uint64_t *from, unsigned *nfrom,
                                  unsigned n)
{
    if (n > *nfrom)
        n = *nfrom;
    memcpy(to + *nto, from + *nfrom - n, n * sizeof *to);
    *nto += n;
    *nfrom -= n;
    return n;
}

/* (pool lock held) What this socket holds above SOCK_KEEP to the pool. */
static inline void sock_spill(XskObject *x)
{
    if (x->nfree > SOCK_KEEP)
        stack_move(x->pool->free_stack, &x->pool->nfree, x->free_stack, &x->nfree,
                   x->nfree - SOCK_KEEP);
}

/* The fill ring from this socket's free chunks, then the pool's, keeping
 * TX_RESERVE back in each. */
static void fill_refill(XskObject *x)
{
    struct xpool *p = x->pool;
    struct xfq *q = x->fq;
    pthread_mutex_lock(&q->mu);
    uint32_t room = ring_room(&q->fill), n = 0;
    uint64_t *d = q->fill.desc;
    while (n < room && x->nfree > TX_RESERVE)
        d[(q->fill.head + n++) & q->fill.mask] = x->free_stack[--x->nfree];
    if (n < room || x->nfree > SOCK_KEEP) {   /* else the pool's lock is not needed */
        pthread_mutex_lock(&p->mu);
        while (n < room && p->nfree > TX_RESERVE)
            d[(q->fill.head + n++) & q->fill.mask] = p->free_stack[--p->nfree];
        sock_spill(x);
        pthread_mutex_unlock(&p->mu);
    }
    if (n)
        ring_produced(&q->fill, n);
    pthread_mutex_unlock(&q->mu);
}

/* Sent chunks (of any socket of the queue) to this socket's stack, topped
 * up from the pool's to TX_RESERVE, the excess given back to the pool. */
static void comp_reap(XskObject *x)
{
    struct xpool *p = x->pool;
    struct xfq *q = x->fq;
    pthread_mutex_lock(&q->mu);
    uint32_t n = ring_ready(&q->comp);
    uint64_t *d = q->comp.desc;
    for (uint32_t i = 0; i < n; i++)
        x->free_stack[x->nfree++] = chunk_of(x, d[(q->comp.head + i) & q->comp.mask]);
    if (n)
        ring_consumed(&q->comp, n);
    pthread_mutex_unlock(&q->mu);
    if (x->nfree >= TX_RESERVE && x->nfree <= SOCK_KEEP)
        return;
    pthread_mutex_lock(&p->mu);
    if (x->nfree < TX_RESERVE)
        stack_move(x->free_stack, &x->nfree, p->free_stack, &p->nfree, TX_RESERVE - x->nfree);
    sock_spill(x);
    pthread_mutex_unlock(&p->mu);
}

/* Ask the kernel to send what this socket's TX ring holds. In copy mode a
 * kick sends at most a batch (32 by default, xsk_generic_xmit) and nothing
 * while the completion ring has no room: `force` kicks a full ring again
 * even when nothing was added since. */
static void tx_kick(XskObject *x, int force)
{
    if (!x->tx_pending && !force)
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
        comp_reap(x);   /* first: the kernel sends only with completion ring room */
        tx_kick(x, 1);
        if (!ring_room(&x->tx))
            return 0;
    }
    struct xdp_desc *d = &((struct xdp_desc *)x->tx.desc)[x->tx.head & x->tx.mask];
    d->addr = addr;
    d->len = len;
    d->options = 0;
    ring_produced(&x->tx, 1);
    if (++x->tx_pending >= 64)
        tx_kick(x, 0);
    return 1;
}

/* Copy a frame (vnet header first) into a free chunk of x and send it. */
static int tx_copy(XskObject *x, const uint8_t *frame, uint32_t len)
{
    if (len <= PYLVS_VNET_HDR_LEN || len - PYLVS_VNET_HDR_LEN > x->frame_size - XDP_PACKET_HEADROOM)
        return 0;
    if (!x->nfree) {
        /* The chunks may all be on the TX ring, waiting for a kick. */
        tx_kick(x, 0);
        comp_reap(x);
    }
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

static void fq_put(struct xfq *q)
{
    if (--q->refs > 0)
        return;
    ring_unmap(&q->fill);
    ring_unmap(&q->comp);
    pthread_mutex_destroy(&q->mu);
    PyMem_RawFree(q);
}

static void pool_put(struct xpool *p)
{
    if (--p->refs > 0)
        return;
    if (p->umem)
        munmap(p->umem, p->umem_len);
    pthread_mutex_destroy(&p->mu);
    PyMem_RawFree(p->free_stack);
    PyMem_RawFree(p);
}

static void xsk_free(XskObject *x)
{
    ring_unmap(&x->rx);
    ring_unmap(&x->tx);
    if (x->fd >= 0) {
        close(x->fd);
        x->fd = -1;
    }
    if (x->fq) {
        fq_put(x->fq);
        x->fq = NULL;
    }
    if (x->pool) {
        /* Its free chunks stay with the UMEM for the other sockets. */
        pthread_mutex_lock(&x->pool->mu);
        if (x->free_stack)
            stack_move(x->pool->free_stack, &x->pool->nfree, x->free_stack, &x->nfree, x->nfree);
        pthread_mutex_unlock(&x->pool->mu);
        pool_put(x->pool);
        x->pool = NULL;
        x->umem = NULL;
    }
    PyMem_Free(x->free_stack);
    x->free_stack = NULL;
    x->nfree = 0;
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

/* A new fill and completion ring pair of fd (before its bind), sized and
 * mapped. NULL with errno set and *what naming the step. */
static struct xfq *fq_new(int fd, unsigned ring_size, const char **what)
{
    struct xfq *q = PyMem_RawCalloc(1, sizeof *q);
    if (!q) {
        errno = ENOMEM;
        return NULL;
    }
    pthread_mutex_init(&q->mu, NULL);
    q->refs = 1;
    *what = "sizing the fill and completion rings";
    if (set_ring(fd, XDP_UMEM_FILL_RING, ring_size) < 0
        || set_ring(fd, XDP_UMEM_COMPLETION_RING, ring_size) < 0)
        goto fail;
    *what = "mapping the fill and completion rings";
    struct xdp_mmap_offsets off;
    socklen_t olen = sizeof off;
    if (getsockopt(fd, SOL_XDP, XDP_MMAP_OFFSETS, &off, &olen) < 0
        || ring_map(fd, &q->fill, &off.fr, ring_size, sizeof(uint64_t), XDP_UMEM_PGOFF_FILL_RING)
        || ring_map(fd, &q->comp, &off.cr, ring_size, sizeof(uint64_t),
                    XDP_UMEM_PGOFF_COMPLETION_RING))
        goto fail;
    q->comp.head = __atomic_load_n(q->comp.consumer, __ATOMIC_ACQUIRE);
    q->fill.head = __atomic_load_n(q->fill.producer, __ATOMIC_ACQUIRE);
    return q;
fail:;
    int err = errno;
    fq_put(q);
    errno = err;
    return NULL;
}

/* A new pool: the UMEM, registered on fd. NULL with errno set and *what
 * naming the step. */
static struct xpool *pool_new(int fd, unsigned nframes, unsigned frame_size, const char **what)
{
    struct xpool *p = PyMem_RawCalloc(1, sizeof *p);
    if (!p) {
        errno = ENOMEM;
        return NULL;
    }
    pthread_mutex_init(&p->mu, NULL);
    p->refs = 1;
    p->nframes = nframes;
    p->frame_size = frame_size;
    *what = "allocating the free chunk stack";
    p->free_stack = PyMem_RawCalloc(nframes, sizeof *p->free_stack);
    if (!p->free_stack) {
        errno = ENOMEM;
        goto fail;
    }
    *what = "allocating the UMEM";
    p->umem_len = (size_t)nframes * frame_size;
    p->umem = mmap(NULL, p->umem_len, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (p->umem == MAP_FAILED) {
        p->umem = NULL;
        goto fail;
    }
    *what = "registering the UMEM (XDP_UMEM_REG)";
    struct xdp_umem_reg reg = {.addr = (uint64_t)(uintptr_t)p->umem, .len = p->umem_len,
                               .chunk_size = frame_size, .headroom = 0};
    if (setsockopt(fd, SOL_XDP, XDP_UMEM_REG, &reg, sizeof reg) < 0)
        goto fail;
    return p;
fail:;
    int err = errno;
    pool_put(p);
    errno = err;
    return NULL;
}

/* OSError(errno, "<what> (ifindex, queue): <strerror>"), errno kept. */
static void xsk_error(const char *what, unsigned ifindex, unsigned queue, int err)
{
    PyObject *msg = PyUnicode_FromFormat("%s (ifindex %u, queue %u): %s", what, ifindex, queue,
                                         strerror(err));
    PyObject *a = msg ? Py_BuildValue("(iO)", err, msg) : NULL;
    Py_XDECREF(msg);
    if (a) {
        PyErr_SetObject(PyExc_OSError, a);
        Py_DECREF(a);
    }
}

static int xsk_init(XskObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"ifindex", "queue", "nframes", "frame_size", "ring_size",
                             "zerocopy", "share", "port", NULL};
    unsigned ifindex, queue = 0, nframes = 8192, frame_size = 4096, ring_size = 2048, port = 0;
    int zerocopy = 1;
    PyObject *share = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "I|IIIIpOI", kwlist, &ifindex, &queue, &nframes,
                                     &frame_size, &ring_size, &zerocopy, &share, &port))
        return -1;
    if (port >= XMAX_PORTS) {
        PyErr_Format(PyExc_ValueError, "port must be below %d", XMAX_PORTS);
        return -1;
    }
    if (self->pool || self->fd >= 0) {
        PyErr_SetString(PyExc_RuntimeError, "Xsk already initialised");
        return -1;
    }
    if (ring_size < 64 || ring_size & (ring_size - 1)) {
        PyErr_SetString(PyExc_ValueError, "ring_size must be a power of two >= 64");
        return -1;
    }
    XskObject *owner = NULL;
    if (share != Py_None) {
        owner = (XskObject *)share;
        if (!PyObject_TypeCheck(share, &XskType) || owner->fd < 0 || owner->busy) {
            PyErr_SetString(PyExc_TypeError, "share must be an open Xsk not in use");
            return -1;
        }
        /* Sharing across interfaces is left out: the chunks would go
         * back and forth between ports with no copy, and one port's UMEM
         * would serve two (docs/io.md, "The rings"). */
        if (owner->ifindex != ifindex) {
            PyErr_SetString(PyExc_ValueError, "share: an Xsk of the same ifindex");
            return -1;
        }
    } else if (frame_size < 2048 || frame_size & (frame_size - 1)
               || nframes < 2 * ring_size + TX_RESERVE) {
        PyErr_SetString(PyExc_ValueError, "frame_size must be a power of two >= 2048, "
                        "nframes >= 2 * ring_size + 512");
        return -1;
    }
    self->ifindex = ifindex;
    self->queue = queue;
    self->port = port;
    const char *what = "creating the AF_XDP socket";
    self->fd = socket(AF_XDP, SOCK_RAW | SOCK_CLOEXEC, 0);
    if (self->fd < 0)
        goto fail;
    if (owner) {
        self->pool = owner->pool;
        self->pool->refs++;
    } else if (!(self->pool = pool_new(self->fd, nframes, frame_size, &what))) {
        goto fail;
    }
    /* The same queue as the socket shared: its rings (the kernel refuses a
     * pair of our own then); another queue, or no sharing: a new pair. */
    if (owner && owner->queue == queue) {
        self->fq = owner->fq;
        self->fq->refs++;
    } else if (!(self->fq = fq_new(self->fd, ring_size, &what))) {
        goto fail;
    } else {
        self->fq_owner = 1;
    }
    self->umem = self->pool->umem;
    self->frame_size = self->pool->frame_size;
    self->free_stack = PyMem_Calloc(self->pool->nframes, sizeof *self->free_stack);
    if (!self->free_stack) {
        errno = ENOMEM;
        goto fail;
    }
    what = "sizing the AF_XDP rings";
    if (set_ring(self->fd, XDP_RX_RING, ring_size) < 0
        || set_ring(self->fd, XDP_TX_RING, ring_size) < 0)
        goto fail;
    what = "mapping the AF_XDP rings";
    struct xdp_mmap_offsets off;
    socklen_t olen = sizeof off;
    if (getsockopt(self->fd, SOL_XDP, XDP_MMAP_OFFSETS, &off, &olen) < 0)
        goto fail;
    if (ring_map(self->fd, &self->rx, &off.rx, ring_size, sizeof(struct xdp_desc), XDP_PGOFF_RX_RING)
        || ring_map(self->fd, &self->tx, &off.tx, ring_size, sizeof(struct xdp_desc), XDP_PGOFF_TX_RING))
        goto fail;
    self->rx.head = __atomic_load_n(self->rx.consumer, __ATOMIC_ACQUIRE);
    self->tx.head = __atomic_load_n(self->tx.producer, __ATOMIC_ACQUIRE);
    what = "binding the AF_XDP socket";
    struct sockaddr_xdp sxdp = {.sxdp_family = AF_XDP, .sxdp_ifindex = ifindex,
                                .sxdp_queue_id = queue};
    if (owner) {
        /* The mode and need_wakeup come with the owner's UMEM (a flag
         * here would be EINVAL). A new queue's fill ring gets chunks
         * before the bind, as the owner's does. */
        if (self->fq_owner)
            fill_refill(self);
        sxdp.sxdp_flags = XDP_SHARED_UMEM;
        sxdp.sxdp_shared_umem_fd = (uint32_t)owner->fd;
        if (bind(self->fd, (struct sockaddr *)&sxdp, sizeof sxdp) < 0)
            goto fail;
        self->shared = 1;
        self->zerocopy = owner->zerocopy;
        return 0;   /* its chunks come from the pool's stack as it needs them */
    }
    for (unsigned i = 0; i < nframes; i++)
        self->free_stack[self->nfree++] = (uint64_t)(nframes - 1 - i) * frame_size;
    fill_refill(self);
    /* Zero-copy where the driver offers it, else copy mode. */
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
    xsk_error(what, ifindex, queue, err);
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
                         /* the queue's fill ring's count: the socket that made it reports it */
                         "rx_fill_ring_empty_descs",
                         self->fq_owner ? (unsigned long long)st.rx_fill_ring_empty_descs : 0ULL,
                         "tx_ring_empty_descs", st.tx_ring_empty_descs);
}

static PyMethodDef xsk_methods[] = {
    {"close", (PyCFunction)xsk_close, METH_NOARGS,
     "Close the socket; the UMEM goes with the last socket that shares it."},
    {"statistics", (PyCFunction)xsk_statistics, METH_NOARGS,
     "statistics() -> dict: the kernel's XDP_STATISTICS of this socket (running totals)."},
    {NULL},
};

#define XU64(name) {#name, T_ULONGLONG, offsetof(XskObject, name), READONLY, NULL}
static PyMemberDef xsk_members[] = {
    {"fd", T_INT, offsetof(XskObject, fd), READONLY, "the AF_XDP socket (for the XSKMAP)"},
    {"ifindex", T_UINT, offsetof(XskObject, ifindex), READONLY, NULL},
    {"queue", T_UINT, offsetof(XskObject, queue), READONLY, NULL},
    {"port", T_UINT, offsetof(XskObject, port), READONLY,
     "the engine's port number: frames received are given it, frames for it are sent here"},
    {"zerocopy", T_INT, offsetof(XskObject, zerocopy), READONLY,
     "1: bound with XDP_ZEROCOPY; 0: copy mode"},
    {"shared", T_INT, offsetof(XskObject, shared), READONLY,
     "1: bound with XDP_SHARED_UMEM to another Xsk's UMEM"},
    {"nfree", T_UINT, offsetof(XskObject, nfree), READONLY,
     "free chunks this socket holds (at most 1024 after a reap or refill)"},
    XU64(rx_frames), XU64(rx_no_headroom), XU64(rx_oversize), XU64(tx_frames), XU64(tx_copied), XU64(tx_no_room),
    XU64(tx_bad_port), XU64(emit_sent), XU64(emit_no_room), XU64(tx_kicks), XU64(tx_kick_errors),
    XU64(polls), XU64(poll_timeouts), XU64(fwd_calls), XU64(fwd_budget_cuts),
    {"last_tx_error", T_INT, offsetof(XskObject, last_tx_error), READONLY, NULL},
    {NULL},
};

static PyTypeObject XskType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pylvs._fast.Xsk",
    .tp_doc = "Xsk(ifindex, queue=0, nframes=8192, frame_size=4096, ring_size=2048, zerocopy=True,\n"
              "    share=None, port=0)\n\n"
              "An AF_XDP socket bound to one rx queue of an interface, with its own UMEM\n"
              "and rings (need_wakeup on; zero-copy when the driver offers it and\n"
              "zerocopy is true, else copy mode). With share=another Xsk of the same\n"
              "ifindex: bound with XDP_SHARED_UMEM to its UMEM, with RX and TX rings of\n"
              "ring_size of its own, taking free chunks from the UMEM's common stack as\n"
              "it needs them; on the other's queue it uses that queue's fill and\n"
              "completion rings (under their lock), on another queue it makes that\n"
              "queue's pair (ring_size); nframes, frame_size and zerocopy are then the\n"
              "other's. port: the engine's port number of the interface (below 64).\n"
              "OSError naming the step that failed; ValueError for bad sizes.",
    .tp_basicsize = sizeof(XskObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = xsk_new,
    .tp_init = (initproc)xsk_init,
    .tp_dealloc = (destructor)xsk_dealloc,
    .tp_methods = xsk_methods,
    .tp_members = xsk_members,
};

/* --- forward -------------------------------------------------------------- */

/* The sockets of seq in x, marked busy, and in tx[port] the first of
 * them on each engine port (NULL: none), the one frames for that port
 * leave by. */
static int get_xsks(PyObject *seq, XskObject **x, XskObject **tx, PyObject **fast)
{
    *fast = PySequence_Fast(seq, "xsks must be a sequence of Xsk");
    if (!*fast)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(*fast);
    if (n < 1 || n > XMAX_XSKS) {
        PyErr_Format(PyExc_ValueError, "between 1 and %d Xsk", XMAX_XSKS);
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
    memset(tx, 0, XMAX_PORTS * sizeof *tx);
    for (Py_ssize_t i = 0; i < n; i++) {
        x[i]->busy = 1;
        if (!tx[x[i]->port])
            tx[x[i]->port] = x[i];
    }
    return (int)n;
}

static inline XskObject *tx_of(XskObject **tx, unsigned port)
{
    return port < XMAX_PORTS ? tx[port] : NULL;
}

static void put_xsks(XskObject **x, int n, PyObject *fast)
{
    for (int i = 0; i < n; i++)
        x[i]->busy = 0;
    Py_DECREF(fast);
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
static void emit_out(XskObject **x, XskObject **tx, struct pylvs_emit *em)
{
    for (uint32_t k = 0; k < em->n; k++) {
        XskObject *t = tx_of(tx, em->port[k]);
        if (!t) {
            x[0]->tx_bad_port++;
            continue;
        }
        if (tx_copy(t, em->buf + em->off[k], em->len[k]))
            t->emit_sent++;
        else
            t->emit_no_room++;
    }
    em->n = em->used = 0;
}

/* Wait (GIL released by the caller) up to timeout_ms for a frame on any
 * RX ring; returns the seconds waited. */
static double wait_rx_nogil(XskObject **x, int n, int timeout_ms)
{
    for (int i = 0; i < n; i++)
        if (ring_ready(&x[i]->rx))
            return 0.0;
    if (timeout_ms == 0)
        return 0.0;
    struct pollfd pfd[XMAX_XSKS];
    for (int i = 0; i < n; i++)
        pfd[i] = (struct pollfd){.fd = x[i]->fd, .events = POLLIN};
    struct timespec t0, t1;
    x[0]->polls++;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int pr = poll(pfd, n, timeout_ms);
    clock_gettime(CLOCK_MONOTONIC, &t1);
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
    PylvsEngine *e = (PylvsEngine *)engine;
    XskObject *x[XMAX_XSKS], *tx[XMAX_PORTS];
    PyObject *fast;
    int n = get_xsks(seq, x, tx, &fast);
    if (n < 0)
        return NULL;
    /* Its own lock is held by this thread: waiting for it would never end. */
    if (pylvs_engine_reentered(e)) {
        put_xsks(x, n, fast);
        PyErr_SetString(PyExc_RuntimeError,
                        "Engine is in use: xsk_forward() called from its scheduler upcall");
        return NULL;
    }
    struct pylvs_emit *em = &x[0]->em;
    if (emit_alloc(em) < 0) {
        put_xsks(x, n, fast);
        return NULL;
    }
    /* The whole call runs without the GIL (the sockets are marked busy and
     * are this worker's; the pools' rings are taken under their locks);
     * the engine's lock is held while frames run, and its scheduler upcall
     * takes the GIL back (docs/io.md, "Workers"). */
    PyThreadState *ts = PyEval_SaveThread();
    for (int p = 0; p < n; p++) {
        comp_reap(x[p]);
        fill_refill(x[p]);
        /* The kernel stopped taking from the fill ring while it was empty. */
        if (need_wakeup(&x[p]->fq->fill))
            recvfrom(x[p]->fd, NULL, 0, MSG_DONTWAIT, NULL, NULL);
    }
    now += wait_rx_nogil(x, n, timeout_ms);
    pylvs_engine_lock(e, ts);
    em->n = em->used = 0;
    long seen = 0;
    int progress = 1;
    while (progress && seen < budget) {
        progress = 0;
        /* Receive pressure (the engine's upcall limit): an eighth of any
         * port's rx ring waiting means the worker is behind. */
        int backlog = 0;
        for (int p = 0; p < n && !backlog; p++)
            backlog = ring_ready(&x[p]->rx) >= x[p]->rx.size / 8;
        pylvs_engine_set_pressure(e, backlog);
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
                int v = pylvs_engine_frame(e, frame, d.len + PYLVS_VNET_HDR_LEN,
                                           (uint16_t)r->port, now, &out, em);
                int kept = 0;
                if (v == PYLVS_V_TX) {
                    XskObject *t = tx_of(tx, out);
                    if (!t) {
                        r->tx_bad_port++;
                    } else if (out == r->port) {
                        /* Back out of the interface it came in on: this
                         * socket's TX ring, the chunk as it is. */
                        kept = tx_post(r, d.addr, d.len);
                        if (kept)
                            r->tx_frames++;
                        else
                            r->tx_no_room++;
                    } else if (tx_copy(t, frame, d.len + PYLVS_VNET_HDR_LEN)) {
                        t->tx_frames++;
                        t->tx_copied++;
                    } else {
                        t->tx_no_room++;
                    }
                }
                if (!kept)
                    r->free_stack[r->nfree++] = chunk;
                if (em->n)
                    emit_out(x, tx, em);
            }
            ring_consumed(&r->rx, avail);
            fill_refill(r);
        }
    }
    x[0]->fwd_calls++;
    if (seen >= budget)
        x[0]->fwd_budget_cuts++;
    ts = pylvs_engine_unlock(e);
    for (int p = 0; p < n; p++)
        tx_kick(x[p], 0);
    PyEval_RestoreThread(ts);
    put_xsks(x, n, fast);
    return PyLong_FromLong(seen);
}

/* --- recv / send: copies, for engines that take a Batch ------------------- */

static PyObject *xsk_recv(PyObject *mod, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"xsks", "buf", "length", "in_port", "timeout_ms", NULL};
    PyObject *seq, *obuf, *olen, *oport;
    int timeout_ms = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOO|i", kwlist, &seq, &obuf, &olen, &oport,
                                     &timeout_ms))
        return NULL;
    XskObject *x[XMAX_XSKS], *tx[XMAX_PORTS];
    PyObject *fast;
    int n = get_xsks(seq, x, tx, &fast);
    if (n < 0)
        return NULL;
    ViewSpec spec[3] = {{obuf, 1, 2, "buf"}, {olen, 4, 1, "length"}, {oport, 2, 1, "in_port"}};
    Py_buffer v[3];
    if (get_views(spec, v, 3) < 0) {
        put_xsks(x, n, fast);
        return NULL;
    }
    Py_ssize_t rows = v[0].shape[0], slot = v[0].shape[1], got = 0;
    if (v[1].shape[0] < rows)
        rows = v[1].shape[0];
    if (v[2].shape[0] < rows)
        rows = v[2].shape[0];
    uint8_t *out = v[0].buf;
    uint32_t *lens = v[1].buf;
    uint16_t *ports = v[2].buf;
    for (int p = 0; p < n; p++) {
        comp_reap(x[p]);
        fill_refill(x[p]);
    }
    if (rows > 0) {
        Py_BEGIN_ALLOW_THREADS
        wait_rx_nogil(x, n, timeout_ms);
        Py_END_ALLOW_THREADS
    }
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
                ports[got] = (uint16_t)r->port;
                got++;
            }
            r->free_stack[r->nfree++] = chunk_of(r, d.addr);
        }
        if (i)
            ring_consumed(&r->rx, i);
        fill_refill(r);
    }
    release_views(v, 3);
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
    XskObject *x[XMAX_XSKS], *tx[XMAX_PORTS];
    PyObject *fast;
    int n = get_xsks(seq, x, tx, &fast);
    if (n < 0)
        return NULL;
    ViewSpec spec[4] = {{obuf, 1, 2, "buf"}, {olen, 4, 1, "length"}, {overd, 1, 1, "verdict"},
                        {oport, 2, 1, "out_port"}};
    Py_buffer v[4];
    if (get_views(spec, v, 4) < 0) {
        put_xsks(x, n, fast);
        return NULL;
    }
    for (int i = 0; i < 4; i++)
        if (count > v[i].shape[0])
            count = v[i].shape[0];
    Py_ssize_t slot = v[0].shape[1];
    uint8_t *buf = v[0].buf, *verd = v[2].buf;
    uint32_t *lens = v[1].buf;
    uint16_t *outp = v[3].buf;
    unsigned long long before = xsk_sent(x, n);
    for (Py_ssize_t i = 0; i < count; i++) {
        if (verd[i] != PYLVS_V_TX)
            continue;
        XskObject *t = tx_of(tx, outp[i]);
        if (!t || lens[i] > slot)
            x[0]->tx_bad_port++;
        else if (tx_copy(t, buf + i * slot, lens[i]))
            t->tx_frames++;
        else
            t->tx_no_room++;
    }
    for (int p = 0; p < n; p++)
        tx_kick(x[p], 0);
    unsigned long long after = xsk_sent(x, n);
    release_views(v, 4);
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
    XskObject *x[XMAX_XSKS], *tx[XMAX_PORTS];
    PyObject *fast;
    int n = get_xsks(seq, x, tx, &fast);
    if (n < 0)
        return NULL;
    ViewSpec spec[5] = {{o[0], 1, 1, "emit_buf"}, {o[1], 4, 1, "emit_off"},
                        {o[2], 4, 1, "emit_len"}, {o[3], 2, 1, "emit_port"},
                        {o[4], 4, 1, "emit_n"}};
    Py_buffer v[5];
    if (get_views(spec, v, 5) < 0) {
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
            XskObject *t = tx_of(tx, port[k]);
            if (!t || len[k] > cap || off[k] > cap - len[k])
                x[0]->tx_bad_port++;
            else if (tx_copy(t, (uint8_t *)v[0].buf + off[k], len[k]))
                t->emit_sent++;
            else
                t->emit_no_room++;
        }
        for (int p = 0; p < n; p++)
            tx_kick(x[p], 0);
    }
    unsigned long long after = xsk_sent(x, n);
    release_views(v, 5);
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
     "Wait up to timeout_ms for a frame on any XSK (its port: the engine port),\n"
     "run the engine on each in its UMEM chunk, send V_TX frames and the frames\n"
     "the engine made on the TX ring of the first XSK of their port in xsks (a\n"
     "frame back out of the port it came in on: the receiving XSK's)."},
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
