/* AF_PACKET forwarder: TPACKET_V3 or TPACKET_V2 receive rings, the engine
 * run on frames in place, and sendmmsg() batches per egress port.
 *
 * Why two ring versions: a V3 block reaches user space only when it is full
 * or its retire timer fires, and the timer counts in jiffies (4 ms at
 * HZ=250, whatever retire_ms asks), so at moderate rates each frame waits up
 * to that long. A V2 ring hands over each frame as soon as the kernel has
 * written it (per-frame tp_status, a wake-up per frame). V2 frames have a
 * fixed size: a frame bigger than its slot (a 64 KiB GSO frame) is queued on
 * the socket as well (PACKET_COPY_THRESH, TP_STATUS_COPY) and read with
 * recv().
 *
 * The sockets are created and configured in Python (pylvs/io/afpacket.py):
 * ETH_P_ALL bound to one interface, PACKET_VNET_HDR, PACKET_IGNORE_OUTGOING,
 * PACKET_QDISC_BYPASS, a BPF filter. A Ring maps the socket's receive ring;
 * the same socket sends (its vnet header setting applies to both ways, so a
 * frame is sent exactly as the engine left it: vnet header + Ethernet).
 *
 * Why frames are processed where the kernel wrote them: the vnet header sits
 * just before the MAC header in the ring (tpacket_rcv reserves room for it),
 * so mac - 10 is a frame in the engine's format and nothing is copied until
 * sendmmsg() builds the outgoing skb.
 *
 * Frames the engine makes (ICMP errors, RSTs, fragments of a frame too big
 * for its egress MTU) go to an emit area and join the same send queues, in
 * the order they were made relative to the ring frames.
 *
 * A Ring may be given a Capture (pylvs run --pcap): every frame it sends is
 * then also copied there, as a pcap record (capture.c).
 */
#include "capture.h"
#include "csum.h"
#include "engine.h"
#include "ip_vs_icmp.h"  /* struct pylvs_emit */
#include "structmember.h"
#include "views.h"

#include <errno.h>
#include <limits.h>
#include <linux/if_packet.h>
#include <linux/virtio_net.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <time.h>

#define MAX_PORTS 64
#define TXQ 256           /* frames per sendmmsg() */
#define MAX_HELD 512      /* blocks consumed but not yet released in one call */
/* forward()'s emit area. It is sent and reset whenever less than
 * EMIT_ROOM_BYTES or EMIT_ROOM_FRAMES are left before the next frame, which
 * is room for the fragments of a 64 KiB frame at an MTU of 1280 and up
 * (smaller MTUs may overflow it: the engine counts emit_overflow). */
#define EMIT_BYTES (256u << 10)
#define EMIT_FRAMES 1024u
#define EMIT_ROOM_BYTES (96u << 10)
#define EMIT_ROOM_FRAMES 64u

typedef struct RingObject {
    PyObject_HEAD
    int fd;
    uint8_t *map;
    size_t map_len;
    unsigned block_size, block_nr;
    unsigned version;             /* TPACKET_V2 or TPACKET_V3 */
    unsigned frame_size, frame_nr;
    unsigned blk;                 /* V3: next block to look at */
    unsigned frm;                 /* V2: next frame to look at */
    struct tpacket3_hdr *pkt;     /* cursor inside the open block (recv) */
    unsigned pkt_left;
    unsigned long long rx_frames, rx_blocks, rx_truncated, rx_vlan, rx_oversize;
    unsigned long long rx_copied;  /* V2: frames too big for a slot, read with recv() */
    unsigned long long tx_frames, tx_errors, tx_bad_port, sock_errors;
    /* Frames from the engine's emit area sent / refused; tx_emsgsize: sends
     * (of either kind) refused with EMSGSIZE, a frame bigger than the
     * egress MTU. */
    unsigned long long emit_sent, emit_errors, tx_emsgsize;
    /* How the data thread spends its calls (kept on the first ring): these
     * told a starved thread (calls cut by the budget, no polls) from a
     * thread that sleeps through arrivals (polls that time out). */
    unsigned long long polls, poll_timeouts, fwd_calls, fwd_budget_cuts, fwd_blocks, fwd_max_blocks;
    int last_error;               /* errno of the last socket error seen */
    int last_tx_error;            /* errno of the last frame sendmmsg() refused */
    int busy;                     /* inside forward / ring_recv / ring_send */
    PylvsCapture *capture;        /* NULL, or where sent frames are copied */
    /* The loopback port (docs/io.md, "Clients on the director"): frames
     * for it are sent as IP packets on this raw socket (-1: none), which
     * the local stack receives with a route attached, where a frame sent
     * on lo would meet the route input's martian-source check. */
    int local_fd;
    /* A second ring on the same port (set_lane): a TPACKET_V2 ring whose
     * frames count as the port's. The adaptive ring (pylvs run --ring auto)
     * gives each V3 ring a V2 lane and moves the port's frames between
     * them with the fanout program. */
    struct RingObject *lane;
} RingObject;

static PyTypeObject RingType;

static inline struct tpacket_block_desc *ring_block(RingObject *r, unsigned i)
{
    return (struct tpacket_block_desc *)(r->map + (size_t)i * r->block_size);
}

static inline int block_ready(struct tpacket_block_desc *bd)
{
    return __atomic_load_n(&bd->hdr.bh1.block_status, __ATOMIC_ACQUIRE) & TP_STATUS_USER;
}

static inline void block_release(struct tpacket_block_desc *bd)
{
    __atomic_store_n(&bd->hdr.bh1.block_status, TP_STATUS_KERNEL, __ATOMIC_RELEASE);
}

/* V2 frames: block_size is a multiple of frame_size, so they are contiguous. */
static inline struct tpacket2_hdr *ring_frame(RingObject *r, unsigned i)
{
    return (struct tpacket2_hdr *)(r->map + (size_t)i * r->frame_size);
}

static inline uint32_t frame_status(struct tpacket2_hdr *h)
{
    return __atomic_load_n(&h->tp_status, __ATOMIC_ACQUIRE);
}

static inline void frame_release(struct tpacket2_hdr *h)
{
    __atomic_store_n(&h->tp_status, TP_STATUS_KERNEL, __ATOMIC_RELEASE);
}

static int ring_init(RingObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "block_size", "block_nr", "frame_size", "retire_ms", "version", NULL};
    int fd;
    unsigned block_size = 1u << 18, block_nr = 16, frame_size = 2048, retire_ms = 1, version = 3;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i|IIIII", kwlist, &fd, &block_size,
                                     &block_nr, &frame_size, &retire_ms, &version))
        return -1;
    if (version != 2 && version != 3) {
        PyErr_SetString(PyExc_ValueError, "version must be 2 (TPACKET_V2) or 3 (TPACKET_V3)");
        return -1;
    }
    if (self->map) {
        PyErr_SetString(PyExc_RuntimeError, "Ring already initialised");
        return -1;
    }
    if (frame_size == 0 || block_size % frame_size || block_nr == 0) {
        PyErr_SetString(PyExc_ValueError, "block_size must be a multiple of frame_size");
        return -1;
    }
    int ver = version == 2 ? TPACKET_V2 : TPACKET_V3;
    if (setsockopt(fd, SOL_PACKET, PACKET_VERSION, &ver, sizeof ver) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    struct tpacket_req3 req;
    memset(&req, 0, sizeof req);
    req.tp_block_size = block_size;
    req.tp_block_nr = block_nr;
    req.tp_frame_size = frame_size;
    req.tp_frame_nr = (block_size / frame_size) * block_nr;
    req.tp_retire_blk_tov = retire_ms;
    /* A tpacket_req3 starts with the fields of a tpacket_req, the V2 request. */
    socklen_t req_len = version == 2 ? sizeof(struct tpacket_req) : sizeof req;
    if (setsockopt(fd, SOL_PACKET, PACKET_RX_RING, &req, req_len) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    size_t len = (size_t)block_size * block_nr;
    void *map = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->fd = fd;
    self->local_fd = -1;
    self->map = map;
    self->map_len = len;
    self->block_size = block_size;
    self->block_nr = block_nr;
    self->version = version;
    self->frame_size = frame_size;
    self->frame_nr = req.tp_frame_nr;
    self->frm = 0;
    self->blk = 0;
    self->pkt = NULL;
    self->pkt_left = 0;
    return 0;
}

static void ring_unmap(RingObject *self)
{
    if (self->map) {
        munmap(self->map, self->map_len);
        self->map = NULL;
    }
}

static void ring_dealloc(RingObject *self)
{
    ring_unmap(self);
    Py_CLEAR(self->capture);
    Py_CLEAR(self->lane);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *ring_close(RingObject *self, PyObject *unused)
{
    /* forward() holds frames in the mapping for its whole call, which runs
     * without the GIL: unmapping it then would pull it from under. */
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Ring is in use by forward/ring_recv/ring_send");
        return NULL;
    }
    ring_unmap(self);
    Py_RETURN_NONE;
}

/* forward() sends without the GIL: the capture may change only while the
 * ring is not in use. */
static PyObject *ring_set_capture(RingObject *self, PyObject *cap)
{
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Ring is in use by forward/ring_recv/ring_send");
        return NULL;
    }
    if (cap != Py_None && !pylvs_capture_check(cap)) {
        PyErr_SetString(PyExc_TypeError, "set_capture needs a pylvs._fast.Capture or None");
        return NULL;
    }
    PylvsCapture *old = self->capture;
    self->capture = cap == Py_None ? NULL : (PylvsCapture *)cap;
    Py_XINCREF(self->capture);
    Py_XDECREF(old);
    Py_RETURN_NONE;
}

static PyObject *ring_get_capture(RingObject *self, void *closure)
{
    PyObject *c = self->capture ? (PyObject *)self->capture : Py_None;
    Py_INCREF(c);
    return c;
}

static PyObject *ring_set_local_fd(RingObject *self, PyObject *arg)
{
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Ring is in use by forward/ring_recv/ring_send");
        return NULL;
    }
    if (fd < -1 || fd > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "local_fd must be a descriptor or -1");
        return NULL;
    }
    self->local_fd = (int)fd;
    Py_RETURN_NONE;
}

/* forward() reads the lane without the GIL: it may change only while
 * neither ring is in use. */
static PyObject *ring_set_lane(RingObject *self, PyObject *arg)
{
    if (arg != Py_None && !PyObject_TypeCheck(arg, &RingType)) {
        PyErr_SetString(PyExc_TypeError, "set_lane needs a Ring or None");
        return NULL;
    }
    RingObject *lane = arg == Py_None ? NULL : (RingObject *)arg;
    if (self->busy || (lane && lane->busy)) {
        PyErr_SetString(PyExc_RuntimeError, "Ring is in use by forward/ring_recv/ring_send");
        return NULL;
    }
    if (lane && (lane == self || lane->lane || lane->version != 2)) {
        PyErr_SetString(PyExc_ValueError, "a lane is another TPACKET_V2 Ring without a lane");
        return NULL;
    }
    RingObject *old = self->lane;
    Py_XINCREF(lane);
    self->lane = lane;
    Py_XDECREF(old);
    Py_RETURN_NONE;
}

static PyObject *ring_get_lane(RingObject *self, void *closure)
{
    PyObject *l = self->lane ? (PyObject *)self->lane : Py_None;
    Py_INCREF(l);
    return l;
}

static PyGetSetDef ring_getset[] = {
    {"capture", (getter)ring_get_capture, NULL, "the Capture sent frames are copied to, or None", NULL},
    {"lane", (getter)ring_get_lane, NULL, "the V2 Ring read as part of this port, or None", NULL},
    {NULL},
};

static PyMethodDef ring_methods[] = {
    {"close", (PyCFunction)ring_close, METH_NOARGS, "Unmap the ring (the socket stays open)."},
    {"set_capture", (PyCFunction)ring_set_capture, METH_O,
     "set_capture(capture or None): copy every frame this ring sends from now on to a Capture."},
    {"set_local_fd", (PyCFunction)ring_set_local_fd, METH_O,
     "set_local_fd(fd or -1): send this port's frames as IP packets on the raw socket fd\n"
     "(socket(AF_INET, SOCK_RAW, IPPROTO_RAW)) instead of the AF_PACKET socket."},
    {"set_lane", (PyCFunction)ring_set_lane, METH_O,
     "set_lane(ring or None): also read this V2 Ring's frames as this port's (forward, ring_recv)."},
    {NULL},
};

#define U64(name) {#name, T_ULONGLONG, offsetof(RingObject, name), READONLY, NULL}
static PyMemberDef ring_members[] = {
    {"fd", T_INT, offsetof(RingObject, fd), READONLY, NULL},
    {"block_size", T_UINT, offsetof(RingObject, block_size), READONLY, NULL},
    {"block_nr", T_UINT, offsetof(RingObject, block_nr), READONLY, NULL},
    {"version", T_UINT, offsetof(RingObject, version), READONLY, "2 (TPACKET_V2) or 3 (TPACKET_V3)"},
    {"frame_nr", T_UINT, offsetof(RingObject, frame_nr), READONLY, NULL},
    U64(rx_frames), U64(rx_copied), U64(rx_blocks), U64(rx_truncated), U64(rx_vlan), U64(rx_oversize),
    U64(tx_frames), U64(tx_errors), U64(tx_bad_port), U64(sock_errors),
    U64(emit_sent), U64(emit_errors), U64(tx_emsgsize),
    U64(polls), U64(poll_timeouts), U64(fwd_calls), U64(fwd_budget_cuts), U64(fwd_blocks),
    U64(fwd_max_blocks),
    {"last_error", T_INT, offsetof(RingObject, last_error), READONLY, NULL},
    {"last_tx_error", T_INT, offsetof(RingObject, last_tx_error), READONLY, NULL},
    {"local_fd", T_INT, offsetof(RingObject, local_fd), READONLY, NULL},
    {NULL},
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pylvs._fast.Ring",
    .tp_doc = "Ring(fd, block_size=262144, block_nr=16, frame_size=2048, retire_ms=1, version=3)\n\n"
              "The TPACKET_V3 (or, version=2, TPACKET_V2) receive ring of a configured AF_PACKET\n"
              "socket. retire_ms applies to V3 only. OSError from the kernel's setsockopt/mmap.",
    .tp_basicsize = sizeof(RingObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)ring_init,
    .tp_dealloc = (destructor)ring_dealloc,
    .tp_methods = ring_methods,
    .tp_members = ring_members,
    .tp_getset = ring_getset,
};

/* --- helpers shared by forward / recv / send ------------------------------ */

/* Borrow the Ring objects of a sequence; their index is the port index.
 * They are marked busy until put_rings(): a call that holds ring blocks may
 * run Python (the scheduler upcall) or let the GIL go (poll), and nothing
 * may close those rings or consume their blocks meanwhile. */
static int get_rings(PyObject *seq, RingObject **rings, PyObject **fast)
{
    *fast = PySequence_Fast(seq, "rings must be a sequence of Ring");
    if (!*fast)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(*fast);
    if (n < 1 || n > MAX_PORTS) {
        PyErr_Format(PyExc_ValueError, "between 1 and %d rings", MAX_PORTS);
        Py_CLEAR(*fast);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o = PySequence_Fast_GET_ITEM(*fast, i);
        if (!PyObject_TypeCheck(o, &RingType) || !((RingObject *)o)->map) {
            PyErr_SetString(PyExc_TypeError, "rings must be open Ring objects");
            Py_CLEAR(*fast);
            return -1;
        }
        RingObject *r = (RingObject *)o;
        if (r->busy || (r->lane && (r->lane->busy || !r->lane->map))) {
            PyErr_SetString(PyExc_RuntimeError, "Ring is in use by forward/ring_recv/ring_send");
            Py_CLEAR(*fast);
            return -1;
        }
        rings[i] = r;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        rings[i]->busy = 1;
        if (rings[i]->lane)
            rings[i]->lane->busy = 1;
    }
    return (int)n;
}

static void put_rings(RingObject **rings, int n, PyObject *fast)
{
    for (int i = 0; i < n; i++) {
        rings[i]->busy = 0;
        if (rings[i]->lane)
            rings[i]->lane->busy = 0;
    }
    Py_DECREF(fast);
}

static inline int ring_ready(RingObject *r)
{
    if (r->version == 2)
        return frame_status(ring_frame(r, r->frm)) & TP_STATUS_USER;
    return r->pkt_left || block_ready(ring_block(r, r->blk));
}

static int any_ready(RingObject **rings, int n)
{
    for (int i = 0; i < n; i++)
        if (ring_ready(rings[i]) || (rings[i]->lane && ring_ready(rings[i]->lane)))
            return 1;
    return 0;
}

static double mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Wait for a retired block on any ring, GIL not held. Returns the seconds
 * spent waiting. */
static double wait_ready_nogil(RingObject **rings, int n, int timeout_ms)
{
    if (timeout_ms == 0 || any_ready(rings, n))
        return 0.0;
    struct pollfd pfd[2 * MAX_PORTS];
    RingObject *of[2 * MAX_PORTS];
    int m = 0;
    for (int i = 0; i < n; i++)
        for (RingObject *r = rings[i]; r; r = r == rings[i] ? r->lane : NULL) {
            pfd[m].fd = r->fd;
            pfd[m].events = POLLIN | POLLERR;
            pfd[m].revents = 0;
            of[m++] = r;
        }
    double t0 = mono(), t1;
    int pr;
    rings[0]->polls++;
    pr = poll(pfd, m, timeout_ms);
    t1 = mono();
    if (pr == 0)
        rings[0]->poll_timeouts++;
    for (int i = 0; i < m; i++) {
        if (pfd[i].revents & POLLERR) {
            /* A pending socket error (ENETDOWN when the link goes down)
             * keeps poll() returning at once: read it to clear it, or the
             * data thread would spin. */
            int err = 0;
            socklen_t len = sizeof err;
            getsockopt(of[i]->fd, SOL_SOCKET, SO_ERROR, &err, &len);
            of[i]->sock_errors++;
            of[i]->last_error = err;
        }
    }
    return t1 - t0;
}

static double wait_ready(RingObject **rings, int n, int timeout_ms)
{
    double waited;
    Py_BEGIN_ALLOW_THREADS
    waited = wait_ready_nogil(rings, n, timeout_ms);
    Py_END_ALLOW_THREADS
    return waited;
}

typedef struct {
    struct mmsghdr msg[TXQ];
    struct iovec iov[TXQ];
    uint8_t emitted[TXQ];  /* from the emit area: counted apart */
    unsigned n;
} TxQueue;

static inline void tx_count(RingObject *r, const TxQueue *q, unsigned i, int sent)
{
    if (q->emitted[i]) {
        if (sent)
            r->emit_sent++;
        else
            r->emit_errors++;
    } else {
        if (sent)
            r->tx_frames++;
        else
            r->tx_errors++;
    }
}

/* Finish a partial checksum (vnet NEEDS_CSUM: the field holds the
 * pseudo-header sum, the rest is the sender's to add over csum_start..end):
 * a packet handed to the local stack by a raw socket is checked in full
 * (CHECKSUM_NONE). `end` is the IP packet's end, padding excluded. */
static int local_csum(uint8_t *frame, uint32_t end)
{
    if (!(frame[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM))
        return 1;
    uint16_t start, off;
    memcpy(&start, frame + 6, 2);   /* virtio_net_hdr: host byte order */
    memcpy(&off, frame + 8, 2);
    uint32_t s = PYLVS_VNET_HDR_LEN + start, f = s + off;
    if (s < PYLVS_VNET_HDR_LEN + 14 + 20 || f + 2 > end)
        return 0;
    uint16_t c = (uint16_t)~pylvs_fold(pylvs_csum_bytes(frame + s, end - s));
    if (c == 0 && frame[PYLVS_VNET_HDR_LEN + 14 + 9] == 17)
        c = 0xffff;   /* UDP: 0 means "no checksum" (RFC 768) */
    pylvs_wr16(frame + f, c);
    frame[0] &= (uint8_t)~VIRTIO_NET_HDR_F_NEEDS_CSUM;
    return 1;
}

/* The loopback port's queue: each frame's IP packet (Ethernet header and
 * padding off) sent on the raw socket to its daddr. A GSO frame goes whole:
 * the local stack takes a packet up to 64 KiB. */
static void local_flush(RingObject *r, TxQueue *q)
{
    for (unsigned i = 0; i < q->n; i++) {
        uint8_t *frame = q->iov[i].iov_base;
        uint32_t len = (uint32_t)q->iov[i].iov_len, hdr = PYLVS_VNET_HDR_LEN + 14;
        int sent = 0;
        if (len >= hdr + 20) {
            uint8_t *ip = frame + hdr;
            uint32_t tot = pylvs_rd16(ip + 2);
            if (tot >= 20 && tot <= len - hdr && local_csum(frame, hdr + tot)) {
                struct sockaddr_in to = {.sin_family = AF_INET};
                memcpy(&to.sin_addr, ip + 16, 4);
                ssize_t w;
                do
                    w = sendto(r->local_fd, ip, tot, MSG_DONTWAIT, (struct sockaddr *)&to, sizeof to);
                while (w < 0 && errno == EINTR);
                sent = w == (ssize_t)tot;
                if (w < 0) {
                    r->last_tx_error = errno;
                    if (errno == EMSGSIZE)
                        r->tx_emsgsize++;
                }
            }
        }
        tx_count(r, q, i, sent);
    }
    q->n = 0;
}

static void txq_flush(RingObject *r, TxQueue *q)
{
    unsigned i = 0, tries = 0;
    if (r->local_fd >= 0) {
        local_flush(r, q);
        return;
    }
    while (i < q->n && tries++ < 2 * TXQ) {
        int s = sendmmsg(r->fd, q->msg + i, q->n - i, MSG_DONTWAIT);
        if (s > 0) {
            if (r->capture)
                pylvs_capture_add(r->capture, q->iov + i, (unsigned)s);
            for (unsigned end = i + (unsigned)s; i < end; i++)
                tx_count(r, q, i, 1);
        } else if (s < 0 && errno == EINTR) {
            continue;
        } else {
            /* The frame at i was refused (ENOBUFS, EMSGSIZE, ...): lose it,
             * as a full NIC queue would, and go on with the rest. */
            int err = s < 0 ? errno : 0;
            r->last_tx_error = err;
            if (err == EMSGSIZE)
                r->tx_emsgsize++;
            tx_count(r, q, i, 0);
            i++;
        }
    }
    for (; i < q->n; i++)
        tx_count(r, q, i, 0);
    q->n = 0;
}

static inline void txq_add(RingObject *r, TxQueue *q, uint8_t *frame, uint32_t len, int emitted)
{
    unsigned k = q->n;
    q->iov[k].iov_base = frame;
    q->iov[k].iov_len = len;
    q->emitted[k] = (uint8_t)emitted;
    memset(&q->msg[k], 0, sizeof q->msg[k]);
    q->msg[k].msg_hdr.msg_iov = &q->iov[k];
    q->msg[k].msg_hdr.msg_iovlen = 1;
    if (++q->n == TXQ)
        txq_flush(r, q);
}

/* Is this ring frame one the engine may see? Counts the reasons it is not. */
static inline int frame_usable(RingObject *r, uint32_t snaplen, uint32_t len, uint32_t status)
{
    if (snaplen < len) {
        r->rx_truncated++;
        return 0;
    }
    /* A VLAN tag taken out by offload would be lost on the way out. */
    if (status & TP_STATUS_VLAN_VALID) {
        r->rx_vlan++;
        return 0;
    }
    return 1;
}

/* --- forward -------------------------------------------------------------- */

/* Each thread's send queues and forward()'s emit area: workers run forward
 * at the same time without the GIL, so these are per thread (made on the
 * thread's first call, freed when it exits). */
/* Room for the largest frame the engine takes (vnet header, Ethernet
 * header, 64 KiB IP packet; tables.MAX_FRAME). */
#define BIG_FRAME (PYLVS_VNET_HDR_LEN + 14 + 65535)

typedef struct {
    TxQueue q[MAX_PORTS];
    struct pylvs_emit em;
    uint8_t big[BIG_FRAME];  /* a V2 frame read with recv() (TP_STATUS_COPY) */
} SendBufs;

static pthread_key_t bufs_key;
static pthread_once_t bufs_once = PTHREAD_ONCE_INIT;
static int bufs_key_ok;

static void bufs_free(void *p)
{
    SendBufs *b = p;
    if (!b)
        return;
    free(b->em.buf);
    free(b->em.off);
    free(b->em.len);
    free(b->em.port);
    free(b);
}

static void bufs_key_init(void)
{
    bufs_key_ok = pthread_key_create(&bufs_key, bufs_free) == 0;
}

/* This thread's buffers; NULL with MemoryError set (GIL held). */
static SendBufs *send_buffers(void)
{
    pthread_once(&bufs_once, bufs_key_init);
    if (!bufs_key_ok) {
        PyErr_SetString(PyExc_RuntimeError, "no thread-specific key for send buffers");
        return NULL;
    }
    SendBufs *b = pthread_getspecific(bufs_key);
    if (b)
        return b;
    b = calloc(1, sizeof *b);
    uint8_t *buf = malloc(EMIT_BYTES);
    uint32_t *off = calloc(EMIT_FRAMES, sizeof *off);
    uint32_t *len = calloc(EMIT_FRAMES, sizeof *len);
    uint16_t *port = calloc(EMIT_FRAMES, sizeof *port);
    if (!b || !buf || !off || !len || !port || pthread_setspecific(bufs_key, b) != 0) {
        free(b);
        free(buf);
        free(off);
        free(len);
        free(port);
        PyErr_NoMemory();
        return NULL;
    }
    b->em = (struct pylvs_emit){.buf = buf, .cap = EMIT_BYTES, .max = EMIT_FRAMES,
                                .off = off, .len = len, .port = port};
    return b;
}

static void flush_all(RingObject **rings, int n, TxQueue *tx_queues)
{
    for (int p = 0; p < n; p++)
        if (tx_queues[p].n)
            txq_flush(rings[p], &tx_queues[p]);
}

/* Queue emitted frames [from, n) on the send queues of their ports. A frame
 * for a port beyond the rings, or lying outside the buffer (emit areas given
 * from Python), is counted in tx_bad_port. */
static void emit_queue(RingObject **rings, int n, TxQueue *tx_queues, const struct pylvs_emit *em,
                       uint32_t from, uint32_t to)
{
    for (uint32_t k = from; k < to; k++) {
        uint16_t o = em->port[k];
        uint32_t off = em->off[k], len = em->len[k];
        if (o >= n || len > em->cap || off > em->cap - len) {
            rings[0]->tx_bad_port++;
            continue;
        }
        txq_add(rings[o], &tx_queues[o], em->buf + off, len, 1);
    }
}

/* Read the frame a V2 ring slot stands for when it was too big for it
 * (TP_STATUS_COPY: the kernel queued it on the socket too) into buf; its
 * length with the vnet header, or 0 after counting why there is none. */
static uint32_t copy_recv(RingObject *r, uint8_t *buf, size_t cap)
{
    ssize_t got;
    do
        got = recv(r->fd, buf, cap, MSG_DONTWAIT | MSG_TRUNC);
    while (got < 0 && errno == EINTR);
    if (got < 0) {
        r->rx_truncated++;
        return 0;
    }
    if ((size_t)got > cap) {
        r->rx_oversize++;
        return 0;
    }
    r->rx_copied++;
    return (uint32_t)got;
}

/* What forward() runs every frame with. */
typedef struct {
    PylvsEngine *e;
    RingObject **rings;
    int n;
    TxQueue *tx_queues;
    struct pylvs_emit *em;
    double now;
    long seen;
} FwdCtx;

/* Make room in the emit area for the next frame's output. */
static inline void emit_make_room(FwdCtx *c)
{
    struct pylvs_emit *em = c->em;
    if (em->cap - em->used < EMIT_ROOM_BYTES || em->max - em->n < EMIT_ROOM_FRAMES) {
        /* The queues point into the emit area: send, then reuse it. */
        flush_all(c->rings, c->n, c->tx_queues);
        em->n = em->used = 0;
    }
}

/* Queue a frame of port p the engine gave `verdict` and `out`, then what
 * it made, em's frames [emitted, emit_end). */
static inline void fwd_out(FwdCtx *c, uint8_t *frame, uint32_t len, int p, int verdict,
                           uint16_t out, uint32_t emitted, uint32_t emit_end)
{
    if (verdict == PYLVS_V_TX) {
        if (out < c->n)
            txq_add(c->rings[out], &c->tx_queues[out], frame, len, 0);
        else
            c->rings[p]->tx_bad_port++;
    }
    if (emit_end != emitted)
        emit_queue(c->rings, c->n, c->tx_queues, c->em, emitted, emit_end);
}

/* Run the engine on one frame (vnet header first) that arrived on port p
 * and queue what it sends. */
static inline void fwd_frame(FwdCtx *c, uint8_t *frame, uint32_t len, int p)
{
    uint16_t out = 0;
    c->rings[p]->rx_frames++;
    c->seen++;
    emit_make_room(c);
    uint32_t emitted = c->em->n;
    int v = pylvs_engine_frame(c->e, frame, len, (uint16_t)p, c->now, &out, c->em);
    fwd_out(c, frame, len, p, v, out, emitted, c->em->n);
}

/* fwd_frame for n frames of port p (n <= PYLVS_ENGINE_RUN_MAX), through
 * the engine's pipeline (pylvs_engine_run), which stops where the emit
 * area needs sending; what they send is queued in the same order. */
static void fwd_run(FwdCtx *c, uint8_t *const *frames, const uint32_t *lens, int n, int p)
{
    uint16_t ports[PYLVS_ENGINE_RUN_MAX], outs[PYLVS_ENGINE_RUN_MAX];
    uint8_t verdicts[PYLVS_ENGINE_RUN_MAX];
    uint32_t emit_end[PYLVS_ENGINE_RUN_MAX];
    for (int i = 0; i < n; i++)
        ports[i] = (uint16_t)p;
    c->rings[p]->rx_frames += n;
    c->seen += n;
    for (int done = 0; done < n;) {
        emit_make_room(c);
        struct pylvs_emit_room room = {.bytes = EMIT_ROOM_BYTES, .frames = EMIT_ROOM_FRAMES,
                                       .emit_end = emit_end + done};
        uint32_t emitted = c->em->n;
        int k = pylvs_engine_run(c->e, frames + done, lens + done, ports + done,
                                 verdicts + done, outs + done, n - done, c->now, c->em, &room);
        for (int i = done; i < done + k; i++) {
            fwd_out(c, frames[i], lens[i], p, verdicts[i], outs[i], emitted, emit_end[i]);
            emitted = emit_end[i];
        }
        done += k;
    }
}

/* Frames of a V2 ring taken per port and round, so that one busy port does
 * not starve the others within a call (at most PYLVS_ENGINE_RUN_MAX: they
 * go through the engine as one run). */
#define V2_ROUND 64
_Static_assert(V2_ROUND <= PYLVS_ENGINE_RUN_MAX, "a V2 round is one engine run");

/* Take up to V2_ROUND ready frames of V2 ring r (port p's ring or its
 * lane); they stay TP_STATUS_USER (forward() hands them back after
 * sending). Returns how many. */
static unsigned fwd_v2(FwdCtx *c, RingObject *r, int p, unsigned room, uint8_t *big)
{
    unsigned k = 0;
    uint8_t *run[V2_ROUND];
    uint32_t run_len[V2_ROUND];
    int nrun = 0;
    if (room > V2_ROUND)
        room = V2_ROUND;
    while (k < room) {
        struct tpacket2_hdr *h = ring_frame(r, r->frm);
        uint32_t st = frame_status(h);
        if (!(st & TP_STATUS_USER))
            break;
        if (st & TP_STATUS_COPY) {
            if (nrun) { /* the frames before it go first */
                fwd_run(c, run, run_len, nrun, p);
                nrun = 0;
            }
            uint32_t len = copy_recv(r, big, BIG_FRAME);
            if (len) {
                fwd_frame(c, big, len, p);
                /* The queues now point into big, which the next copy reuses. */
                flush_all(c->rings, c->n, c->tx_queues);
            }
        } else if (frame_usable(r, h->tp_snaplen, h->tp_len, st)) {
            run[nrun] = (uint8_t *)h + h->tp_mac - PYLVS_VNET_HDR_LEN;
            run_len[nrun++] = h->tp_snaplen + PYLVS_VNET_HDR_LEN;
        }
        r->frm = (r->frm + 1) % r->frame_nr;
        r->rx_blocks++;   /* a V2 slot is the ring's unit, as a V3 block is */
        k++;
    }
    if (nrun)
        fwd_run(c, run, run_len, nrun, p);
    return k;
}

/* Receive pressure (the engine's upcall limit): an eighth of ring r is
 * ready beyond what this call has `taken` of it. Units are filled in ring
 * order, so one look, a unit that far ahead, tells. */
static int ring_backlog(RingObject *r, unsigned taken)
{
    if (r->version == 2) {
        unsigned k = r->frame_nr / 8;
        return taken + k < r->frame_nr &&
               (frame_status(ring_frame(r, (r->frm + k) % r->frame_nr)) & TP_STATUS_USER);
    }
    unsigned k = r->block_nr / 8;
    return taken + k < r->block_nr && block_ready(ring_block(r, (r->blk + k) % r->block_nr));
}

static PyObject *afp_forward(PyObject *mod, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"engine", "rings", "now", "timeout_ms", "budget", NULL};
    PyObject *engine, *seq;
    double now;
    int timeout_ms = 0;
    long budget = 4096;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOd|il", kwlist, &engine, &seq, &now,
                                     &timeout_ms, &budget))
        return NULL;
    if (!pylvs_engine_check(engine)) {
        PyErr_SetString(PyExc_TypeError, "forward() needs a pylvs._fast.Engine");
        return NULL;
    }
    PylvsEngine *e = (PylvsEngine *)engine;
    RingObject *rings[MAX_PORTS];
    PyObject *fast;
    int n = get_rings(seq, rings, &fast);
    if (n < 0)
        return NULL;
    /* Its own lock is held by this thread: waiting for it would never end. */
    if (pylvs_engine_reentered(e)) {
        put_rings(rings, n, fast);
        PyErr_SetString(PyExc_RuntimeError,
                        "Engine is in use: forward() called from its scheduler upcall");
        return NULL;
    }
    SendBufs *bufs = send_buffers();
    if (!bufs) {
        put_rings(rings, n, fast);
        return NULL;
    }
    TxQueue *tx_queues = bufs->q;
    /* The whole call runs without the GIL (the rings are marked busy and
     * the buffers are this thread's); the engine's lock is held while it
     * runs, and its scheduler upcall takes the GIL back. */
    PyThreadState *ts = PyEval_SaveThread();
    now += wait_ready_nogil(rings, n, timeout_ms);
    pylvs_engine_lock(e, ts);

    struct pylvs_emit *em = &bufs->em;
    em->n = em->used = 0;
    FwdCtx c = {.e = e, .rings = rings, .n = n, .tx_queues = tx_queues, .em = em, .now = now};
    struct tpacket_block_desc *held[MAX_HELD];
    int nheld = 0;
    unsigned long long units = 0;   /* V3 blocks and V2 frames taken */
    int progress = 1;
    unsigned taken[MAX_PORTS] = {0}, first[MAX_PORTS];
    unsigned ltaken[MAX_PORTS] = {0}, lfirst[MAX_PORTS];
    for (int p = 0; p < n; p++) {
        first[p] = rings[p]->frm;
        lfirst[p] = rings[p]->lane ? rings[p]->lane->frm : 0;
    }
    /* Round robin over the ports, one block (or V2_ROUND frames) at a time,
     * so one busy port cannot starve the others within a call. */
    while (progress && c.seen < budget && nheld < MAX_HELD) {
        progress = 0;
        /* Any port backed up: the worker is behind on all of them. */
        int backlog = 0;
        for (int p = 0; p < n && !backlog; p++)
            backlog = ring_backlog(rings[p], taken[p]) ||
                      (rings[p]->lane && ring_backlog(rings[p]->lane, ltaken[p]));
        pylvs_engine_set_pressure(e, backlog);
        for (int p = 0; p < n && nheld < MAX_HELD; p++) {
            RingObject *r = rings[p];
            if (r->lane) {
                unsigned k = fwd_v2(&c, r->lane, p, r->lane->frame_nr - ltaken[p], bufs->big);
                ltaken[p] += k;
                units += k;
                progress |= k != 0;
            }
            /* Held blocks and frames stay TP_STATUS_USER until the end of
             * the call: going round a full ring would meet them again and
             * run the engine twice on frames it already rewrote. */
            if (r->version == 2) {
                unsigned k = fwd_v2(&c, r, p, r->frame_nr - taken[p], bufs->big);
                taken[p] += k;
                units += k;
                progress |= k != 0;
                continue;
            }
            if (taken[p] >= r->block_nr)
                continue;
            struct tpacket_block_desc *bd = ring_block(r, r->blk);
            struct tpacket3_hdr *h;
            unsigned left;
            if (r->pkt_left) {  /* a block recv() left half read */
                h = r->pkt;
                left = r->pkt_left;
                r->pkt_left = 0;
                r->pkt = NULL;
            } else if (block_ready(bd)) {
                h = (struct tpacket3_hdr *)((uint8_t *)bd + bd->hdr.bh1.offset_to_first_pkt);
                left = bd->hdr.bh1.num_pkts;
                r->rx_blocks++;
            } else {
                continue;
            }
            progress = 1;
            uint8_t *run[PYLVS_ENGINE_RUN_MAX];
            uint32_t run_len[PYLVS_ENGINE_RUN_MAX];
            int nrun = 0;
            for (; left; left--) {
                if (frame_usable(r, h->tp_snaplen, h->tp_len, h->tp_status)) {
                    run[nrun] = (uint8_t *)h + h->tp_mac - PYLVS_VNET_HDR_LEN;
                    run_len[nrun++] = h->tp_snaplen + PYLVS_VNET_HDR_LEN;
                    if (nrun == PYLVS_ENGINE_RUN_MAX) {
                        fwd_run(&c, run, run_len, nrun, p);
                        nrun = 0;
                    }
                }
                if (left > 1)
                    h = (struct tpacket3_hdr *)((uint8_t *)h + h->tp_next_offset);
            }
            if (nrun)
                fwd_run(&c, run, run_len, nrun, p);
            held[nheld++] = bd;
            taken[p]++;
            units++;
            r->blk = (r->blk + 1) % r->block_nr;
        }
    }
    rings[0]->fwd_calls++;
    rings[0]->fwd_blocks += units;
    if (units > rings[0]->fwd_max_blocks)
        rings[0]->fwd_max_blocks = units;
    if (c.seen >= budget)
        rings[0]->fwd_budget_cuts++;
    ts = pylvs_engine_unlock(e);
    /* Frames point into the held blocks: send before giving them back. */
    flush_all(rings, n, tx_queues);
    em->n = em->used = 0;
    for (int i = 0; i < nheld; i++)
        block_release(held[i]);
    for (int p = 0; p < n; p++) {
        if (rings[p]->version == 2)
            for (unsigned i = 0; i < taken[p]; i++)
                frame_release(ring_frame(rings[p], (first[p] + i) % rings[p]->frame_nr));
        for (unsigned i = 0; i < ltaken[p]; i++)
            frame_release(ring_frame(rings[p]->lane, (lfirst[p] + i) % rings[p]->lane->frame_nr));
    }
    PyEval_RestoreThread(ts);
    put_rings(rings, n, fast);
    return PyLong_FromLong(c.seen);
}

/* --- recv / send: copies, for engines that take a Batch ------------------- */

/* Copy the ready frames of V2 ring r (port p) into rows [got, rows) of
 * out, giving each slot back at once; returns the frames copied. */
static Py_ssize_t recv_v2(RingObject *r, int p, uint8_t *out, Py_ssize_t slot, uint32_t *lens,
                          uint16_t *ports, Py_ssize_t got, Py_ssize_t rows)
{
    Py_ssize_t k = 0;
    while (got + k < rows) {
        struct tpacket2_hdr *h = ring_frame(r, r->frm);
        uint32_t st = frame_status(h), len = 0;
        uint8_t *dst = out + (got + k) * slot;
        if (!(st & TP_STATUS_USER))
            break;
        if (st & TP_STATUS_COPY) {
            len = copy_recv(r, dst, (size_t)slot);
        } else if (frame_usable(r, h->tp_snaplen, h->tp_len, st)) {
            len = h->tp_snaplen + PYLVS_VNET_HDR_LEN;
            if (len > slot) {
                r->rx_oversize++;
                len = 0;
            } else {
                memcpy(dst, (uint8_t *)h + h->tp_mac - PYLVS_VNET_HDR_LEN, len);
            }
        }
        frame_release(h);
        r->frm = (r->frm + 1) % r->frame_nr;
        r->rx_blocks++;
        if (len) {
            lens[got + k] = len;
            ports[got + k] = (uint16_t)p;
            r->rx_frames++;
            k++;
        }
    }
    return k;
}

static PyObject *afp_recv(PyObject *mod, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"rings", "buf", "length", "in_port", "timeout_ms", NULL};
    PyObject *seq, *obuf, *olen, *oport;
    int timeout_ms = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOO|i", kwlist, &seq, &obuf, &olen,
                                     &oport, &timeout_ms))
        return NULL;
    RingObject *rings[MAX_PORTS];
    PyObject *fast;
    int n = get_rings(seq, rings, &fast);
    if (n < 0)
        return NULL;
    ViewSpec spec[3] = {{obuf, 1, 2, "buf"}, {olen, 4, 1, "length"}, {oport, 2, 1, "in_port"}};
    Py_buffer v[3];
    if (get_views(spec, v, 3) < 0) {
        put_rings(rings, n, fast);
        return NULL;
    }
    Py_buffer vb = v[0], vl = v[1], vp = v[2];
    Py_ssize_t rows = vb.shape[0], slot = vb.shape[1];
    if (vl.shape[0] < rows)
        rows = vl.shape[0];
    if (vp.shape[0] < rows)
        rows = vp.shape[0];
    uint8_t *out = vb.buf;
    uint32_t *lens = vl.buf;
    uint16_t *ports = vp.buf;

    wait_ready(rings, n, timeout_ms);
    Py_ssize_t got = 0;
    int progress = 1;
    while (progress && got < rows) {
        progress = 0;
        for (int p = 0; p < n && got < rows; p++) {
            RingObject *r = rings[p];
            if (r->lane && got < rows) {
                got += recv_v2(r->lane, p, out, slot, lens, ports, got, rows);
                progress |= ring_ready(r->lane) && got < rows;
            }
            if (r->version == 2) {
                got += recv_v2(r, p, out, slot, lens, ports, got, rows);
                progress |= ring_ready(r) && got < rows;
                continue;
            }
            struct tpacket_block_desc *bd = ring_block(r, r->blk);
            if (!r->pkt_left) {
                if (!block_ready(bd))
                    continue;
                r->pkt = (struct tpacket3_hdr *)((uint8_t *)bd + bd->hdr.bh1.offset_to_first_pkt);
                r->pkt_left = bd->hdr.bh1.num_pkts;
                r->rx_blocks++;
                if (!r->pkt_left) {  /* an empty block retired by the timer */
                    block_release(bd);
                    r->blk = (r->blk + 1) % r->block_nr;
                    progress = 1;
                    continue;
                }
            }
            progress = 1;
            while (r->pkt_left && got < rows) {
                struct tpacket3_hdr *h = r->pkt;
                if (frame_usable(r, h->tp_snaplen, h->tp_len, h->tp_status)) {
                    uint32_t len = h->tp_snaplen + PYLVS_VNET_HDR_LEN;
                    if (len > slot) {
                        r->rx_oversize++;
                    } else {
                        memcpy(out + got * slot, (uint8_t *)h + h->tp_mac - PYLVS_VNET_HDR_LEN, len);
                        lens[got] = len;
                        ports[got] = (uint16_t)p;
                        got++;
                        r->rx_frames++;
                    }
                }
                if (--r->pkt_left)
                    r->pkt = (struct tpacket3_hdr *)((uint8_t *)h + h->tp_next_offset);
            }
            if (!r->pkt_left) {
                r->pkt = NULL;
                block_release(bd);
                r->blk = (r->blk + 1) % r->block_nr;
            }
        }
    }
    release_views(v, 3);
    put_rings(rings, n, fast);
    return PyLong_FromSsize_t(got);
}

static unsigned long long sent_total(RingObject **rings, int n)
{
    unsigned long long t = 0;
    for (int p = 0; p < n; p++)
        t += rings[p]->tx_frames + rings[p]->emit_sent;
    return t;
}

static PyObject *afp_send(PyObject *mod, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"rings", "buf", "length", "verdict", "out_port", "count", NULL};
    PyObject *seq, *obuf, *olen, *overd, *oport;
    Py_ssize_t count;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOn", kwlist, &seq, &obuf, &olen,
                                     &overd, &oport, &count))
        return NULL;
    RingObject *rings[MAX_PORTS];
    PyObject *fast;
    int n = get_rings(seq, rings, &fast);
    if (n < 0)
        return NULL;
    ViewSpec spec[4] = {{obuf, 1, 2, "buf"}, {olen, 4, 1, "length"}, {overd, 1, 1, "verdict"},
                        {oport, 2, 1, "out_port"}};
    Py_buffer v[4];
    SendBufs *bufs = send_buffers();
    if (!bufs || get_views(spec, v, 4) < 0) {
        put_rings(rings, n, fast);
        return NULL;
    }
    Py_ssize_t slot = v[0].shape[1];
    for (int i = 0; i < 4; i++)
        if (count > v[i].shape[0])
            count = v[i].shape[0];
    uint8_t *buf = v[0].buf, *verd = v[2].buf;
    uint32_t *lens = v[1].buf;
    uint16_t *outp = v[3].buf;
    unsigned long long before = sent_total(rings, n);
    for (Py_ssize_t i = 0; i < count; i++) {
        if (verd[i] != PYLVS_V_TX)
            continue;
        uint16_t o = outp[i];
        if (o >= n || lens[i] > slot) {
            rings[0]->tx_bad_port++;
            continue;
        }
        txq_add(rings[o], &bufs->q[o], buf + i * slot, lens[i], 0);
    }
    flush_all(rings, n, bufs->q);
    release_views(v, 4);
    unsigned long long after = sent_total(rings, n);
    put_rings(rings, n, fast);
    return PyLong_FromUnsignedLongLong(after - before);
}

static PyObject *afp_emit_send(PyObject *mod, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"rings", "emit_buf", "emit_off", "emit_len", "emit_port", "emit_n", NULL};
    PyObject *seq, *obuf, *ooff, *olen, *oport, *on;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOO", kwlist, &seq, &obuf, &ooff, &olen,
                                     &oport, &on))
        return NULL;
    RingObject *rings[MAX_PORTS];
    PyObject *fast;
    int n = get_rings(seq, rings, &fast);
    if (n < 0)
        return NULL;
    ViewSpec spec[5] = {{obuf, 1, 1, "emit_buf"}, {ooff, 4, 1, "emit_off"}, {olen, 4, 1, "emit_len"},
                        {oport, 2, 1, "emit_port"}, {on, 4, 1, "emit_n"}};
    Py_buffer v[5];
    SendBufs *bufs = send_buffers();
    if (!bufs || get_views(spec, v, 5) < 0) {
        put_rings(rings, n, fast);
        return NULL;
    }
    if (v[4].shape[0] < 1 || v[0].shape[0] > UINT32_MAX) {
        release_views(v, 5);
        put_rings(rings, n, fast);
        PyErr_SetString(PyExc_ValueError, "emit_n needs (frames, bytes); emit_buf at most 4 GiB");
        return NULL;
    }
    uint32_t frames = ((uint32_t *)v[4].buf)[0];
    for (int i = 1; i < 4; i++)
        if (frames > v[i].shape[0])
            frames = (uint32_t)v[i].shape[0];
    struct pylvs_emit em = {.buf = v[0].buf, .cap = (uint32_t)v[0].shape[0], .n = frames,
                            .max = frames, .off = v[1].buf, .len = v[2].buf, .port = v[3].buf};
    unsigned long long before = sent_total(rings, n);
    emit_queue(rings, n, bufs->q, &em, 0, em.n);
    flush_all(rings, n, bufs->q);
    release_views(v, 5);
    unsigned long long after = sent_total(rings, n);
    put_rings(rings, n, fast);
    return PyLong_FromUnsignedLongLong(after - before);
}

static PyMethodDef afp_functions[] = {
    {"forward", (PyCFunction)(void (*)(void))afp_forward, METH_VARARGS | METH_KEYWORDS,
     "forward(engine, rings, now, timeout_ms=0, budget=4096) -> frames seen\n\n"
     "Wait up to timeout_ms for a retired block (V3) or a frame (V2), run the\n"
     "engine on every ready frame in place, send V_TX frames with one sendmmsg()\n"
     "per port batch, then give the blocks or frames back to the kernel."},
    {"ring_recv", (PyCFunction)(void (*)(void))afp_recv, METH_VARARGS | METH_KEYWORDS,
     "ring_recv(rings, buf, length, in_port, timeout_ms=0) -> frames copied"},
    {"ring_send", (PyCFunction)(void (*)(void))afp_send, METH_VARARGS | METH_KEYWORDS,
     "ring_send(rings, buf, length, verdict, out_port, count) -> frames sent"},
    {"emit_send", (PyCFunction)(void (*)(void))afp_emit_send, METH_VARARGS | METH_KEYWORDS,
     "emit_send(rings, emit_buf, emit_off, emit_len, emit_port, emit_n) -> frames sent\n\n"
     "Send the first emit_n[0] frames of a Batch's emit area: frame k is\n"
     "emit_buf[emit_off[k]:][:emit_len[k]] (vnet header included), on port emit_port[k]."},
    {NULL},
};

int pylvs_afpacket_register(PyObject *module)
{
    if (PyType_Ready(&RingType) < 0)
        return -1;
    Py_INCREF(&RingType);
    if (PyModule_AddObject(module, "Ring", (PyObject *)&RingType) < 0) {
        Py_DECREF(&RingType);
        return -1;
    }
    return PyModule_AddFunctions(module, afp_functions);
}
