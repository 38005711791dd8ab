/* The Engine type: the per-frame data path (docs/engine.md).
 * Skeleton so the extension builds; the data path is being filled in. */
#include "engine.h"
#include "structmember.h"

struct pylvs_engine {
    PyObject_HEAD
    Py_ssize_t capacity;
};

static PyTypeObject EngineType;

int pylvs_engine_check(PyObject *obj)
{
    return PyObject_TypeCheck(obj, &EngineType);
}

int pylvs_engine_frame(PylvsEngine *e, uint8_t *frame, uint32_t len,
                       uint16_t in_port, double now, uint16_t *out_port)
{
    return PYLVS_V_PASS;
}

long pylvs_engine_expire(PylvsEngine *e, double now, long budget)
{
    return 0;
}

static int engine_init(PylvsEngine *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"capacity", "key", "transitions", "timeouts",
                             "counters", "schedule", NULL};
    Py_ssize_t capacity;
    PyObject *key, *transitions, *timeouts, *counters, *schedule;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "n$OOOOO", kwlist, &capacity, &key,
                                     &transitions, &timeouts, &counters, &schedule))
        return -1;
    self->capacity = capacity;
    return 0;
}

static PyObject *engine_not_yet(PyObject *self, PyObject *args)
{
    PyErr_SetString(PyExc_NotImplementedError, "pylvs._fast.Engine: not yet");
    return NULL;
}

static PyMethodDef engine_methods[] = {
    {"set_tables", engine_not_yet, METH_VARARGS, NULL},
    {"set_timeouts", engine_not_yet, METH_VARARGS, NULL},
    {"process", engine_not_yet, METH_VARARGS, NULL},
    {"expire", engine_not_yet, METH_VARARGS, NULL},
    {"conns", engine_not_yet, METH_NOARGS, NULL},
    {NULL},
};

static PyMemberDef engine_members[] = {
    {"capacity", T_PYSSIZET, offsetof(PylvsEngine, capacity), READONLY, NULL},
    {NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pylvs._fast.Engine",
    .tp_basicsize = sizeof(PylvsEngine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)engine_init,
    .tp_methods = engine_methods,
    .tp_members = engine_members,
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
    return 0;
}
