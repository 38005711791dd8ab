/* Buffer views of a Batch's arrays, for the copy paths (recv / send /
 * emit_send) of the AF_PACKET (afpacket.c) and AF_XDP (xdp.c) backends. */
#ifndef PYLVS_VIEWS_H
#define PYLVS_VIEWS_H

#include <Python.h>

typedef struct {
    PyObject *obj;
    Py_ssize_t itemsize;
    int ndim;
    const char *what;
} ViewSpec;

/* Writable C-contiguous views of k arrays with these item sizes and
 * dimensions, all or none (released on error: ValueError naming the
 * array, or the buffer protocol's error). */
static inline int get_views(const ViewSpec *spec, Py_buffer *v, int k)
{
    for (int i = 0; i < k; i++) {
        if (PyObject_GetBuffer(spec[i].obj, &v[i], PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) == 0) {
            if (v[i].itemsize == spec[i].itemsize && v[i].ndim == spec[i].ndim)
                continue;
            PyErr_Format(PyExc_ValueError, "%s: wrong item size or dimensions", spec[i].what);
            PyBuffer_Release(&v[i]);
        }
        while (i--)
            PyBuffer_Release(&v[i]);
        return -1;
    }
    return 0;
}

static inline void release_views(Py_buffer *v, int k)
{
    for (int i = 0; i < k; i++)
        PyBuffer_Release(&v[i]);
}

#endif
