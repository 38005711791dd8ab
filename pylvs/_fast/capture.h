/* A copy of what the AF_PACKET rings transmit, as classic pcap records, for
 * `pylvs run --pcap FILE` (pylvs/io/pcap.py drains it from another thread). */
#ifndef PYLVS_CAPTURE_H
#define PYLVS_CAPTURE_H

#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/uio.h>

/* The pcap header's snaplen: room for a 64 KiB GSO frame with its headers. */
#define PYLVS_PCAP_SNAPLEN 262144u

typedef struct {
    PyObject_HEAD
    uint8_t *buf;
    size_t cap, used;
    unsigned long long frames, dropped, bytes;
    /* Workers append without the GIL (one Capture serves every worker's
     * rings) while the writer thread takes: both under this lock. */
    pthread_mutex_t mu;
    int mu_ready;
} PylvsCapture;

/* Append the frames iov[0..n) (each starting with the vnet header, which is
 * left out) stamped with the current wall-clock time; frames that do not fit
 * are counted in `dropped`. Thread-safe, GIL not needed, never fails. */
void pylvs_capture_add(PylvsCapture *c, const struct iovec *iov, unsigned n);

int pylvs_capture_check(PyObject *o);
int pylvs_capture_register(PyObject *module);

#endif
