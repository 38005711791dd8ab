/* Capture: a bounded buffer of pcap records (the libpcap savefile format,
 * pcap-savefile(5): per record ts_sec, ts_usec, incl_len, orig_len in host
 * byte order, then the Ethernet frame).
 *
 * Why a buffer filled by the data thread and taken whole by a writer thread:
 * the data thread must never wait for a disk. Appending is a memcpy under a
 * mutex held for that memcpy only (workers append without the GIL); when the writer falls behind, records are dropped
 * and counted rather than the data path slowed. take() hands over everything
 * buffered in one bytes object, so the writer pays one copy per period, not
 * one Python call per frame.
 */
#include "capture.h"
#include "engine.h"  /* PYLVS_VNET_HDR_LEN */
#include "structmember.h"

#include <string.h>
#include <time.h>

#define REC_HDR 16u

static PyTypeObject CaptureType;

int pylvs_capture_check(PyObject *o)
{
    return PyObject_TypeCheck(o, &CaptureType);
}

void pylvs_capture_add(PylvsCapture *c, const struct iovec *iov, unsigned n)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint32_t hdr[4] = {(uint32_t)ts.tv_sec, (uint32_t)(ts.tv_nsec / 1000), 0, 0};
    pthread_mutex_lock(&c->mu);
    for (unsigned i = 0; i < n; i++) {
        if (iov[i].iov_len <= PYLVS_VNET_HDR_LEN)
            continue;
        uint32_t len = (uint32_t)(iov[i].iov_len - PYLVS_VNET_HDR_LEN);
        uint32_t incl = len < PYLVS_PCAP_SNAPLEN ? len : PYLVS_PCAP_SNAPLEN;
        if (c->cap - c->used < REC_HDR + incl) {
            c->dropped++;
            continue;
        }
        hdr[2] = incl;
        hdr[3] = len;
        memcpy(c->buf + c->used, hdr, REC_HDR);
        memcpy(c->buf + c->used + REC_HDR, (const uint8_t *)iov[i].iov_base + PYLVS_VNET_HDR_LEN, incl);
        c->used += REC_HDR + incl;
        c->frames++;
        c->bytes += len;
    }
    pthread_mutex_unlock(&c->mu);
}

static int capture_init(PylvsCapture *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"buffer_bytes", NULL};
    Py_ssize_t size = 4 << 20;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|n", kwlist, &size))
        return -1;
    /* One record of the largest frame must fit, or such frames would only
     * ever be counted as dropped. */
    if (size < (Py_ssize_t)(REC_HDR + PYLVS_PCAP_SNAPLEN) || size > ((Py_ssize_t)1 << 30)) {
        PyErr_Format(PyExc_ValueError, "buffer_bytes must be between %u and %zd",
                     REC_HDR + PYLVS_PCAP_SNAPLEN, (Py_ssize_t)1 << 30);
        return -1;
    }
    uint8_t *buf = PyMem_Malloc((size_t)size);
    if (!buf) {
        PyErr_NoMemory();
        return -1;
    }
    if (!self->mu_ready) {
        pthread_mutex_init(&self->mu, NULL);
        self->mu_ready = 1;
    }
    PyMem_Free(self->buf);
    self->buf = buf;
    self->cap = (size_t)size;
    self->used = 0;
    return 0;
}

static void capture_dealloc(PylvsCapture *self)
{
    PyMem_Free(self->buf);
    if (self->mu_ready)
        pthread_mutex_destroy(&self->mu);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *capture_take(PylvsCapture *self, PyObject *unused)
{
    if (!self->mu_ready) {
        PyErr_SetString(PyExc_RuntimeError, "Capture not initialised");
        return NULL;
    }
    /* Copied under the lock; a worker waits at most for this memcpy. */
    PyObject *out;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->mu);
    Py_END_ALLOW_THREADS
    out = PyBytes_FromStringAndSize((const char *)self->buf, (Py_ssize_t)self->used);
    if (out)
        self->used = 0;
    pthread_mutex_unlock(&self->mu);
    return out;
}

static PyMethodDef capture_methods[] = {
    {"take", (PyCFunction)capture_take, METH_NOARGS,
     "take() -> bytes: the pcap records buffered so far (possibly empty); empties the buffer."},
    {NULL},
};

static PyMemberDef capture_members[] = {
    {"frames", T_ULONGLONG, offsetof(PylvsCapture, frames), READONLY, "records buffered"},
    {"dropped", T_ULONGLONG, offsetof(PylvsCapture, dropped), READONLY,
     "frames sent but not recorded: the buffer was full"},
    {"bytes", T_ULONGLONG, offsetof(PylvsCapture, bytes), READONLY, "frame bytes recorded"},
    {NULL},
};

static PyTypeObject CaptureType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pylvs._fast.Capture",
    .tp_doc = "Capture(buffer_bytes=4194304)\n\n"
              "pcap records (Ethernet, microsecond timestamps, snaplen 262144) of the frames\n"
              "sent by the Rings it is given to (Ring.set_capture), buffered up to\n"
              "buffer_bytes; take() empties it. Frames that do not fit are counted in\n"
              "dropped.",
    .tp_basicsize = sizeof(PylvsCapture),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)capture_init,
    .tp_dealloc = (destructor)capture_dealloc,
    .tp_methods = capture_methods,
    .tp_members = capture_members,
};

int pylvs_capture_register(PyObject *module)
{
    if (PyType_Ready(&CaptureType) < 0)
        return -1;
    Py_INCREF(&CaptureType);
    if (PyModule_AddObject(module, "Capture", (PyObject *)&CaptureType) < 0) {
        Py_DECREF(&CaptureType);
        return -1;
    }
    PyModule_AddIntConstant(module, "PCAP_SNAPLEN", PYLVS_PCAP_SNAPLEN);
    return 0;
}
