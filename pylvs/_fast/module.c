/* The one C extension of pylvs: the engine, the AF_PACKET and TAP forwarders. */
#include "capture.h"
#include "engine.h"
#include "ip_vs_icmp.h"
#include "ip_vs_sched.h"
#include "ip_vs_xmit_tun.h"

static struct PyModuleDef fast_module = {
    PyModuleDef_HEAD_INIT, "pylvs._fast",
    "pylvs data path: connection table, NAT rewrite, checksums, AF_PACKET rings.",
    -1, NULL,
};

PyMODINIT_FUNC PyInit__fast(void)
{
    PyObject *m = PyModule_Create(&fast_module);
    if (m == NULL)
        return NULL;
    if (pylvs_engine_register(m) < 0 || pylvs_afpacket_register(m) < 0 ||
        pylvs_icmp_register(m) < 0 || pylvs_tun_register(m) < 0 ||
        pylvs_capture_register(m) < 0 || pylvs_tap_register(m) < 0 ||
        pylvs_xdp_register(m) < 0 || pylvs_sched_register(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
