/* The TAP forwarder: frames from TAP file descriptors through the engine.
 *
 * _fast.tap_forward(engine, fds, now, timeout_ms, buf, emit, counters)
 *   -> (frames, passed)
 *
 * A TAP gives one frame per read(2) and takes one per write(2) (no
 * recvmmsg/sendmmsg on a character device), so a call polls every fd, reads
 * up to buf.shape[0] frames (ports in turn, until each says EAGAIN) into the
 * rows of `buf`, runs them through the engine's pipeline (pylvs_engine_run)
 * in place, then writes, in order, each V_TX frame to its out port and each
 * frame the engine made (the emit area) to its port. The system calls run
 * with the GIL released; the engine runs with it (a new flow calls the
 * Python scheduler).
 *
 * `buf`: uint8 [n, slot], C-contiguous: frame i is read into row i with its
 * virtio_net_hdr (the TAP has IFF_VNET_HDR). `emit`: a tables.Batch-style
 * tuple (emit_buf uint8, emit_off uint32, emit_len uint32, emit_port uint16)
 * large enough for what a whole batch can make: it is not flushed within a
 * call. `counters`: uint64 [N_TAP_COUNTERS], in the order of TAP_COUNTERS in
 * pylvs/io/tap.py, added to. `passed`: a list of (port, bytes) of the frames
 * the engine passed (V_PASS: ARP, traffic for the director itself), which
 * the caller hands to its host; copies are made for those only.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "engine.h"
#include "ip_vs_icmp.h"

#define TAP_MAX_PORTS 64

enum {
    TC_RX_FRAMES, TC_RX_OVERSIZE, TC_TX_FRAMES, TC_TX_ERRORS, TC_EMIT_SENT, TC_EMIT_ERRORS,
    TC_TX_BAD_PORT, TC_POLLS, TC_POLL_TIMEOUTS, TC_FWD_CALLS, TC_RX_ERRORS, N_TAP_COUNTERS
};

static int writable_view(PyObject *obj, Py_buffer *v, Py_ssize_t itemsize, int ndim,
                         const char *what)
{
    if (PyObject_GetBuffer(obj, v, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT
                                       | PyBUF_ND) < 0)
        return -1;
    if (v->itemsize != itemsize || v->ndim != ndim) {
        PyErr_Format(PyExc_TypeError, "tap_forward(): %s has the wrong dtype or shape", what);
        PyBuffer_Release(v);
        return -1;
    }
    return 0;
}

/* One write; counts it under ok or bad. */
static void tap_write(int fd, const uint8_t *frame, uint32_t len, uint64_t *c, int ok, int bad)
{
    ssize_t w;
    do
        w = write(fd, frame, len);
    while (w < 0 && errno == EINTR);
    c[w == (ssize_t)len ? ok : bad]++;
}

static PyObject *tap_forward(PyObject *mod, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"engine", "fds", "now", "timeout_ms", "buf", "emit", "counters",
                             NULL};
    PyObject *engine, *fdseq, *bufobj, *emitobj, *cobj;
    double now;
    int timeout_ms;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOdiOOO", kwlist, &engine, &fdseq, &now,
                                     &timeout_ms, &bufobj, &emitobj, &cobj))
        return NULL;
    if (!pylvs_engine_check(engine)) {
        PyErr_SetString(PyExc_TypeError, "tap_forward() needs a pylvs._fast.Engine");
        return NULL;
    }
    struct pollfd pfd[TAP_MAX_PORTS];
    int nports = 0;
    {
        PyObject *fast = PySequence_Fast(fdseq, "fds must be a sequence of ints");
        if (!fast)
            return NULL;
        Py_ssize_t k = PySequence_Fast_GET_SIZE(fast);
        if (k < 1 || k > TAP_MAX_PORTS) {
            Py_DECREF(fast);
            PyErr_Format(PyExc_ValueError, "tap_forward(): 1..%d fds", TAP_MAX_PORTS);
            return NULL;
        }
        for (Py_ssize_t i = 0; i < k; i++) {
            long fd = PyLong_AsLong(PySequence_Fast_GET_ITEM(fast, i));
            if (fd == -1 && PyErr_Occurred()) {
                Py_DECREF(fast);
                return NULL;
            }
            pfd[i] = (struct pollfd){.fd = (int)fd, .events = POLLIN};
        }
        nports = (int)k;
        Py_DECREF(fast);
    }
    PyObject *eb, *eo, *el, *ep;
    if (!PyArg_ParseTuple(emitobj, "OOOO;emit must be (buf, off, len, port)", &eb, &eo, &el,
                          &ep))
        return NULL;
    Py_buffer vb, vc, veb, veo, vel, vep;
    if (writable_view(bufobj, &vb, 1, 2, "buf") < 0)
        return NULL;
    if (writable_view(cobj, &vc, 8, 1, "counters") < 0)
        goto fail_b;
    if (vc.shape[0] < N_TAP_COUNTERS) {
        PyErr_SetString(PyExc_ValueError, "tap_forward(): counters too short");
        goto fail_c;
    }
    if (writable_view(eb, &veb, 1, 1, "emit buf") < 0)
        goto fail_c;
    if (writable_view(eo, &veo, 4, 1, "emit off") < 0)
        goto fail_eb;
    if (writable_view(el, &vel, 4, 1, "emit len") < 0)
        goto fail_eo;
    if (writable_view(ep, &vep, 2, 1, "emit port") < 0)
        goto fail_el;
    if (vel.shape[0] < veo.shape[0] || vep.shape[0] < veo.shape[0] || veb.len > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "tap_forward(): emit arrays of different sizes");
        goto fail_ep;
    }

    uint64_t *c = vc.buf;
    uint8_t *buf = vb.buf;
    Py_ssize_t rows = vb.shape[0], slot = vb.shape[1];
    if (rows > 1024)
        rows = 1024;
    uint32_t len[1024], emit_from[1025];
    uint16_t inport[1024], outport[1024];
    uint8_t verdict[1024];
    Py_ssize_t n = 0;
    int backlog = 0;
    c[TC_FWD_CALLS]++;
    c[TC_POLLS]++;

    Py_BEGIN_ALLOW_THREADS
    int r = poll(pfd, nports, timeout_ms);
    if (r <= 0) {
        c[TC_POLL_TIMEOUTS]++;
    } else {
        int live[TAP_MAX_PORTS], nlive = nports;
        for (int p = 0; p < nports; p++)
            live[p] = 1;
        while (nlive && n < rows) {
            for (int p = 0; p < nports && n < rows; p++) {
                if (!live[p])
                    continue;
                ssize_t got = read(pfd[p].fd, buf + n * slot, (size_t)slot);
                if (got < 0) {
                    if (errno == EINTR)
                        continue;
                    if (errno != EAGAIN)
                        c[TC_RX_ERRORS]++;
                    live[p] = 0;
                    nlive--;
                    continue;
                }
                if (got >= slot) {  /* cannot tell a whole frame from a cut one */
                    c[TC_RX_OVERSIZE]++;
                    continue;
                }
                len[n] = (uint32_t)got;
                inport[n] = (uint16_t)p;
                n++;
            }
        }
        /* Receive pressure (the engine's upcall limit): the batch filled up
         * before a queue ran dry, so frames are waiting. A TAP queue shows
         * no fill level to look at. */
        backlog = n == rows && nlive > 0;
    }
    Py_END_ALLOW_THREADS
    c[TC_RX_FRAMES] += n;

    struct pylvs_emit em = {.buf = veb.buf, .cap = (uint32_t)veb.len, .used = 0, .n = 0,
                            .max = (uint32_t)veo.shape[0], .off = veo.buf, .len = vel.buf,
                            .port = vep.buf};
    pylvs_engine_set_pressure((PylvsEngine *)engine, backlog);
    /* The engine's pipeline, PYLVS_ENGINE_RUN_MAX frames at a time; frame
     * i's output is emit_from[i] up to emit_from[i + 1]. */
    emit_from[0] = em.n;
    for (Py_ssize_t i0 = 0; i0 < n; i0 += PYLVS_ENGINE_RUN_MAX) {
        int k = n - i0 < PYLVS_ENGINE_RUN_MAX ? (int)(n - i0) : PYLVS_ENGINE_RUN_MAX;
        uint8_t *frames[PYLVS_ENGINE_RUN_MAX];
        for (int j = 0; j < k; j++) {
            frames[j] = buf + (i0 + j) * slot;
            outport[i0 + j] = 0;
        }
        struct pylvs_emit_room room = {.bytes = 0, .frames = 0, .emit_end = emit_from + i0 + 1};
        pylvs_engine_run((PylvsEngine *)engine, frames, len + i0, inport + i0, verdict + i0,
                         outport + i0, k, now, &em, &room);
    }

    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        if (verdict[i] == PYLVS_V_TX) {
            if (outport[i] < nports)
                tap_write(pfd[outport[i]].fd, buf + i * slot, len[i], c, TC_TX_FRAMES,
                          TC_TX_ERRORS);
            else
                c[TC_TX_BAD_PORT]++;
        }
        for (uint32_t k = emit_from[i]; k < emit_from[i + 1]; k++) {
            uint32_t off = em.off[k], l = em.len[k];
            if (em.port[k] >= nports || l > em.cap || off > em.cap - l)
                c[TC_TX_BAD_PORT]++;
            else
                tap_write(pfd[em.port[k]].fd, em.buf + off, l, c, TC_EMIT_SENT,
                          TC_EMIT_ERRORS);
        }
    }
    Py_END_ALLOW_THREADS

    PyObject *passed = PyList_New(0);
    for (Py_ssize_t i = 0; passed && i < n; i++) {
        if (verdict[i] != PYLVS_V_PASS)
            continue;
        PyObject *item = Py_BuildValue("(iy#)", (int)inport[i], (const char *)(buf + i * slot),
                                       (Py_ssize_t)len[i]);
        if (!item || PyList_Append(passed, item) < 0)
            Py_CLEAR(passed);
        Py_XDECREF(item);
    }
    PyBuffer_Release(&vep);
    PyBuffer_Release(&vel);
    PyBuffer_Release(&veo);
    PyBuffer_Release(&veb);
    PyBuffer_Release(&vc);
    PyBuffer_Release(&vb);
    if (!passed)
        return NULL;
    return Py_BuildValue("(nN)", n, passed);

fail_ep:
    PyBuffer_Release(&vep);
fail_el:
    PyBuffer_Release(&vel);
fail_eo:
    PyBuffer_Release(&veo);
fail_eb:
    PyBuffer_Release(&veb);
fail_c:
    PyBuffer_Release(&vc);
fail_b:
    PyBuffer_Release(&vb);
    return NULL;
}

static PyMethodDef tap_functions[] = {
    {"tap_forward", (PyCFunction)(void (*)(void))tap_forward, METH_VARARGS | METH_KEYWORDS,
     "tap_forward(engine, fds, now, timeout_ms, buf, emit, counters) -> (frames, passed)\n"
     "Read frames from TAP fds, run the engine, write the results (pylvs/io/tap.py)."},
    {NULL, NULL, 0, NULL},
};

int pylvs_tap_register(PyObject *module)
{
    return PyModule_AddFunctions(module, tap_functions);
}
