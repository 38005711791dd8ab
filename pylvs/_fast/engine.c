/* The Engine type: the per-frame data path of pylvs (docs/engine.md).
 *
 * One conn slab of `capacity` entries and one open-addressing index over it
 * (linear probing, backward-shift deletion, keyed SipHash-1-3). Each conn
 * sits in the index twice: under its IN key (client -> VIP) and its OUT key
 * (real server -> client), so one probe classifies a frame's direction.
 *
 * Memory shared with Python (counters, service and dest tables) is held
 * through Py_buffer views for as long as the engine points into it. The only
 * Python call on the frame path is the scheduler upcall for a new flow.
 */
#include "engine.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "csum.h"
#include "siphash.h"

/* --- layouts shared with pylvs/engine/tables.py and states.py ------------ */

#define SVC_F_USED 1
#define DEST_F_USED 1
#define DEST_F_RESOLVED 2
#define FWD_MASQ 0
#define PROTO_TCP 6
#define PROTO_UDP 17

#define N_DIRS 3
#define N_EVENTS 4
#define N_TCP_STATES 11
#define UDP_STATE N_TCP_STATES
#define N_TIMEOUTS (N_TCP_STATES + 1)
#define S_NONE 0
#define S_ESTABLISHED 1
#define S_TIME_WAIT 5 /* states.TIME_WAIT, the kernel's numbering */
#define DIR_INPUT 0
#define DIR_OUTPUT 1
#define EV_SYN 0
#define EV_FIN 1
#define EV_ACK 2
#define EV_RST 3
#define TH_FIN 0x01
#define TH_SYN 0x02
#define TH_RST 0x04
#define TH_ACK 0x10

#define N_TRAFFIC 5
#define T_CONNS 0
#define T_INPKTS 1
#define T_OUTPKTS 2
#define T_INBYTES 3
#define T_OUTBYTES 4
#define C_ACTIVE 0
#define C_INACTIVE 1

#define VNET_F_NEEDS_CSUM 1

/* SERVICE_DTYPE (align=True) */
typedef struct {
    uint32_t vaddr;
    uint16_t vport;
    uint8_t proto;
    uint8_t flags;
} svc_row;

/* DEST_DTYPE (align=True) */
typedef struct {
    uint32_t daddr;
    uint16_t dport;
    uint16_t svc;
    uint32_t weight;
    uint8_t fwd;
    uint8_t flags;
    uint16_t out_port;
    uint8_t dmac[6];
    uint8_t smac[6];
} dest_row;

_Static_assert(sizeof(svc_row) == 8, "SERVICE_DTYPE is 8 bytes");
_Static_assert(sizeof(dest_row) == 28, "DEST_DTYPE is 28 bytes");

/* --- conns and the index -------------------------------------------------- */

/* One cache line per conn: an established frame touches one index entry and
 * one line here. */
struct conn {
    uint32_t caddr, vaddr, daddr;
    uint16_t cport, vport, dport;
    uint8_t proto, state;
    double expires;
    uint32_t dest;
    uint16_t svc;
    uint16_t in_port;
    uint8_t fwd;
    uint8_t used;
    uint8_t cmac[6];
    uint8_t lmac[6];
} __attribute__((aligned(64)));

/* ref 0 is an empty bucket; otherwise ref - 1 = conn slot << 1 | direction.
 * tag holds the low 32 bits of the key's hash: the home bucket is tag & mask,
 * and comparing tags first keeps most foreign entries from costing a conn
 * cache miss. */
struct bucket {
    uint32_t tag;
    uint32_t ref;
};

/* Frames between prefetching a conn and using it; its index bucket is
 * prefetched twice as far ahead. At ~30-40 ns of work per frame, 4 covers a
 * DRAM miss (measured: 2 is too short, 8 no better). */
#ifndef PREFETCH_DISTANCE
#define PREFETCH_DISTANCE 4
#endif

#define N_BATCH_ARRAYS 5

#define KEY_IN 0
#define KEY_OUT 1
#define MAX_CAPACITY (1u << 26)

struct pylvs_engine {
    PyObject_HEAD
    uint32_t capacity;
    uint32_t conn_count;
    struct conn *conns;
    uint32_t *free_slots; /* a stack: the top is the next slot handed out */
    uint32_t nfree;
    struct bucket *index;
    uint32_t mask;
    uint32_t hand; /* the expiry clock hand over the slab */
    uint64_t k0, k1;
    uint8_t trans[N_DIRS][N_EVENTS][N_TCP_STATES];
    double timeouts[N_TIMEOUTS];
    int busy; /* inside the scheduler upcall: the tables must stay put */

    PyObject *schedule;
    PyObject *counters;
    Py_buffer stats_view, svc_stats_view, dest_stats_view, dest_conns_view;
    uint64_t *stats;
    uint64_t (*svc_stats)[N_TRAFFIC];
    uint64_t (*dest_stats)[N_TRAFFIC];
    int32_t (*dest_conns)[2];
    uint32_t max_services, max_dests;

    int have_tables;
    Py_buffer services_view, dests_view;
    const svc_row *services;
    const dest_row *dests;
    uint32_t nservices, ndests;

    int batch_cached;
    Py_buffer batch_views[N_BATCH_ARRAYS];
};

static PyTypeObject EngineType;

/* The established path is one function: GCC would otherwise leave these
 * out of line in a function as large as engine_frame. */
#define HOT static inline __attribute__((always_inline))

/* Tables of a megabyte or more go in their own mapping with transparent huge
 * pages asked for: a lookup in a 100k-conn table is two random reads, and
 * with 4 KiB pages each would also miss the TLB. Zeroed, as calloc. */
#define HUGE_PAGE (2u << 20)

static void *table_alloc(size_t size)
{
    if (size < (1u << 20)) {
        void *p = NULL;
        if (posix_memalign(&p, 64, size) != 0)
            return NULL;
        memset(p, 0, size);
        return p;
    }
    size = (size + HUGE_PAGE - 1) & ~(size_t)(HUGE_PAGE - 1);
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
#ifdef MADV_HUGEPAGE
    madvise(p, size, MADV_HUGEPAGE);
#endif
    return p;
}

static void table_free(void *p, size_t size)
{
    if (p == NULL)
        return;
    if (size < (1u << 20)) {
        free(p);
        return;
    }
    size = (size + HUGE_PAGE - 1) & ~(size_t)(HUGE_PAGE - 1);
    munmap(p, size);
}

int pylvs_engine_check(PyObject *obj)
{
    return PyObject_TypeCheck(obj, &EngineType);
}

/* The 13-byte tuple (proto, a1, p1, a2, p2), addresses and ports in network
 * byte order as on the wire, read as SipHash's two little-endian words. */
HOT uint64_t key_hash(const PylvsEngine *e, uint8_t proto, uint32_t a1,
                      uint16_t p1, uint32_t a2, uint16_t p2)
{
    uint32_t a1n = __builtin_bswap32(a1), a2n = __builtin_bswap32(a2);
    uint16_t p1n = __builtin_bswap16(p1), p2n = __builtin_bswap16(p2);
    uint64_t m0 = (uint64_t)proto | (uint64_t)a1n << 8 | (uint64_t)p1n << 40 |
                  (uint64_t)(a2n & 0xff) << 56;
    uint64_t m1 = (uint64_t)(a2n >> 8) | (uint64_t)p2n << 24 | (uint64_t)13 << 56;
    return pylvs_siphash13_2w(e->k0, e->k1, m0, m1);
}

static inline uint64_t conn_key_hash(const PylvsEngine *e, const struct conn *c, int dir)
{
    if (dir == KEY_IN)
        return key_hash(e, c->proto, c->caddr, c->cport, c->vaddr, c->vport);
    return key_hash(e, c->proto, c->daddr, c->dport, c->caddr, c->cport);
}

HOT int conn_matches(const struct conn *c, int dir, uint8_t proto, uint32_t a1,
                     uint16_t p1, uint32_t a2, uint16_t p2)
{
    if (c->proto != proto)
        return 0;
    if (dir == KEY_IN)
        return c->caddr == a1 && c->cport == p1 && c->vaddr == a2 && c->vport == p2;
    return c->daddr == a1 && c->dport == p1 && c->caddr == a2 && c->cport == p2;
}

/* The bucket holding the key, or NULL. */
HOT struct bucket *index_find(PylvsEngine *e, uint64_t h, uint8_t proto,
                              uint32_t a1, uint16_t p1, uint32_t a2, uint16_t p2)
{
    uint32_t tag = (uint32_t)h;
    uint32_t i = tag & e->mask;
    for (;;) {
        struct bucket *b = &e->index[i];
        if (b->ref == 0)
            return NULL;
        if (b->tag == tag) {
            uint32_t r = b->ref - 1;
            if (conn_matches(&e->conns[r >> 1], r & 1, proto, a1, p1, a2, p2))
                return b;
        }
        i = (i + 1) & e->mask;
    }
}

/* The load stays <= 1/2, so an empty bucket is always found. */
static void index_insert(PylvsEngine *e, uint64_t h, uint32_t slot, int dir)
{
    uint32_t tag = (uint32_t)h;
    uint32_t i = tag & e->mask;
    while (e->index[i].ref != 0)
        i = (i + 1) & e->mask;
    e->index[i].tag = tag;
    e->index[i].ref = (slot << 1 | (uint32_t)dir) + 1;
}

/* Remove the entry `ref` and shift later members of the probe run back, so
 * that no tombstones accumulate and every remaining key stays reachable
 * from its home bucket without a gap. */
static void index_delete(PylvsEngine *e, uint64_t h, uint32_t ref)
{
    uint32_t mask = e->mask;
    uint32_t i = (uint32_t)h & mask;
    while (e->index[i].ref != ref) {
        if (e->index[i].ref == 0)
            return; /* not indexed: cannot happen while the slab and index agree */
        i = (i + 1) & mask;
    }
    uint32_t hole = i;
    for (;;) {
        i = (i + 1) & mask;
        struct bucket *b = &e->index[i];
        if (b->ref == 0)
            break;
        uint32_t home = b->tag & mask;
        /* b may fill the hole only if the hole lies on its path from home */
        if (((i - home) & mask) >= ((i - hole) & mask)) {
            e->index[hole] = *b;
            hole = i;
        }
    }
    e->index[hole].ref = 0;
    e->index[hole].tag = 0;
}

static void conn_remove(PylvsEngine *e, uint32_t slot)
{
    struct conn *c = &e->conns[slot];
    index_delete(e, conn_key_hash(e, c, KEY_IN), (slot << 1 | KEY_IN) + 1);
    index_delete(e, conn_key_hash(e, c, KEY_OUT), (slot << 1 | KEY_OUT) + 1);
    if (c->dest < e->max_dests)
        e->dest_conns[c->dest][c->state == S_ESTABLISHED ? C_ACTIVE : C_INACTIVE] -= 1;
    c->used = 0;
    e->free_slots[e->nfree++] = slot;
    e->conn_count--;
    e->stats[ST_CONNS_EXPIRED]++;
}

long pylvs_engine_expire(PylvsEngine *e, double now, long budget)
{
    if (budget <= 0 || e->capacity == 0 || e->busy)
        return 0;
    /* The hand ends where `budget` single steps would leave it, but a slot
     * is never visited twice in one call: a second lap finds nothing more. */
    uint32_t visits = (unsigned long)budget < e->capacity ? (uint32_t)budget : e->capacity;
    uint32_t start = e->hand;
    long expired = 0;
    uint32_t pos = start;
    for (uint32_t n = 0; n < visits; n++) {
        struct conn *c = &e->conns[pos];
        if (c->used && c->expires <= now) {
            conn_remove(e, pos);
            expired++;
        }
        if (++pos == e->capacity)
            pos = 0;
    }
    e->hand = (uint32_t)((start + (unsigned long)budget % e->capacity) % e->capacity);
    return expired;
}

/* --- the frame path ------------------------------------------------------- */

HOT int finish(PylvsEngine *e, int stat, int verdict)
{
    e->stats[stat]++;
    return verdict;
}

HOT int tcp_event(uint8_t flags)
{
    if (flags & TH_RST)
        return EV_RST;
    if (flags & TH_SYN)
        return EV_SYN;
    if (flags & TH_FIN)
        return EV_FIN;
    if (flags & TH_ACK)
        return EV_ACK;
    return -1;
}

HOT void conn_set_state(PylvsEngine *e, struct conn *c, int dir, uint8_t tcpflags,
                        double now)
{
    uint8_t old = c->state, new_ = old;
    if (c->proto == PROTO_TCP) {
        int ev = tcp_event(tcpflags);
        if (ev >= 0 && old < N_TCP_STATES)
            new_ = e->trans[dir][ev][old];
    } else {
        new_ = UDP_STATE;
    }
    if ((old == S_ESTABLISHED) != (new_ == S_ESTABLISHED)) {
        int32_t *dc = e->dest_conns[c->dest];
        if (new_ == S_ESTABLISHED) {
            dc[C_ACTIVE] += 1;
            dc[C_INACTIVE] -= 1;
        } else {
            dc[C_ACTIVE] -= 1;
            dc[C_INACTIVE] += 1;
        }
    }
    c->state = new_;
    c->expires = now + e->timeouts[new_];
}

/* Checksums after one address and one port of the packet changed. */
HOT void fix_csums(PylvsEngine *e, uint8_t *frame, uint8_t *ip, uint8_t *l4,
                   uint32_t l4len, uint8_t proto, uint32_t oaddr, uint32_t naddr,
                   uint16_t oport, uint16_t nport)
{
    uint64_t daddr_delta = pylvs_delta32(oaddr, naddr);
    pylvs_wr16(ip + 10, pylvs_csum_update(pylvs_rd16(ip + 10), daddr_delta));

    uint8_t *field = l4 + (proto == PROTO_TCP ? 16 : 6);
    if (frame[0] & VNET_F_NEEDS_CSUM) {
        if (frame[1] != 0) {
            /* GSO: the field is the plain pseudo-header sum; the ports are
             * summed by whoever segments the frame. */
            pylvs_wr16(field, pylvs_fold((uint64_t)pylvs_rd16(field) + daddr_delta));
            e->stats[ST_GSO_FRAMES]++;
        } else {
            pylvs_wr16(field, 0);
            uint64_t s = (uint64_t)pylvs_csum_bytes(l4, l4len) + (pylvs_rd32(ip + 12) >> 16) +
                         (pylvs_rd32(ip + 12) & 0xffff) + (pylvs_rd32(ip + 16) >> 16) +
                         (pylvs_rd32(ip + 16) & 0xffff) + proto + l4len;
            uint16_t c = (uint16_t)~pylvs_fold(s);
            if (c == 0 && proto == PROTO_UDP)
                c = 0xffff;
            pylvs_wr16(field, c);
            frame[0] = 0;
            e->stats[ST_CSUM_PARTIAL_FIXED]++;
        }
        return;
    }
    uint16_t old = pylvs_rd16(field);
    if (proto == PROTO_UDP && old == 0)
        return; /* no checksum was sent: none to keep right */
    uint16_t c = pylvs_csum_update(old, daddr_delta + pylvs_delta16(oport, nport));
    if (c == 0 && proto == PROTO_UDP)
        c = 0xffff;
    pylvs_wr16(field, c);
}

static int find_service(const PylvsEngine *e, uint8_t proto, uint32_t vaddr, uint16_t vport)
{
    for (uint32_t s = 0; s < e->nservices; s++) {
        const svc_row *r = &e->services[s];
        if ((r->flags & SVC_F_USED) && r->proto == proto && r->vaddr == vaddr &&
            r->vport == vport)
            return (int)s;
    }
    return -1;
}

/* Ask the Python scheduler for a dest. Returns the slot, -1 for none, or -2
 * when it raised (already reported). */
static long call_schedule(PylvsEngine *e, int svc, uint32_t caddr, uint16_t cport)
{
    if (e->schedule == NULL)
        return -1;
    PyObject *args[3];
    args[0] = PyLong_FromLong(svc);
    args[1] = PyLong_FromUnsignedLong(caddr);
    args[2] = PyLong_FromLong(cport);
    PyObject *res = NULL;
    long d = -1;
    int overflow = 0;
    if (args[0] && args[1] && args[2]) {
        PyObject *sched = e->schedule;
        Py_INCREF(sched);
        e->busy = 1;
        res = PyObject_Vectorcall(sched, args, 3, NULL);
        /* Reading the answer may run Python too (__index__, __del__). */
        if (res != NULL) {
            d = PyLong_AsLongAndOverflow(res, &overflow);
            Py_DECREF(res);
        }
        e->busy = 0;
        Py_DECREF(sched);
    }
    Py_XDECREF(args[0]);
    Py_XDECREF(args[1]);
    Py_XDECREF(args[2]);
    if (res != NULL) {
        if (overflow)
            return -1; /* no dest has such a slot */
        if (!(d == -1 && PyErr_Occurred()))
            return d < 0 ? -1 : d;
    }
    PyErr_WriteUnraisable(e->schedule ? e->schedule : Py_None);
    return -2;
}

/* A frame the miss path turns away: count it, give the verdict. */
static struct conn *refuse(PylvsEngine *e, int *verdict, int stat, int v)
{
    *verdict = finish(e, stat, v);
    return NULL;
}

/* No live conn for the frame: a new one if a service wants it (step 8).
 * Returns the new conn, or NULL with *verdict set and counted. Out of line:
 * it is the rare path, and it calls Python. */
static __attribute__((noinline)) struct conn *
conn_new(PylvsEngine *e, uint8_t proto, uint32_t saddr, uint16_t sport, uint32_t daddr,
         uint16_t dport, uint8_t tcpflags, uint64_t h, const uint8_t *eth, uint16_t in_port,
         double now, int *verdict)
{
    int s = find_service(e, proto, daddr, dport);
    if (s < 0)
        return refuse(e, verdict, ST_PASS_NOT_OURS, PYLVS_V_PASS);
    if (proto == PROTO_TCP &&
        (!(tcpflags & TH_SYN) || (tcpflags & (TH_ACK | TH_RST))))
        return refuse(e, verdict, ST_DROP_NO_CONN, PYLVS_V_DROP);
    long d = call_schedule(e, s, saddr, sport);
    if (d == -2)
        return refuse(e, verdict, ST_SCHED_ERRORS, PYLVS_V_DROP);
    if (d < 0 || (unsigned long)d >= e->ndests)
        return refuse(e, verdict, ST_DROP_NO_DEST, PYLVS_V_DROP);
    const dest_row *dest = &e->dests[d];
    if (!(dest->flags & DEST_F_USED) || dest->svc != (uint16_t)s)
        return refuse(e, verdict, ST_DROP_NO_DEST, PYLVS_V_DROP);

    uint64_t hout = key_hash(e, proto, dest->daddr, dest->dport, saddr, sport);
    struct bucket *ob = index_find(e, hout, proto, dest->daddr, dest->dport, saddr, sport);
    if (ob != NULL) {
        uint32_t r = ob->ref - 1;
        if (e->conns[r >> 1].expires > now)
            return refuse(e, verdict, ST_DROP_CONFLICT, PYLVS_V_DROP);
        conn_remove(e, r >> 1); /* a dead holder does not block the key */
    }
    /* IN key == OUT key: client, VIP and real server are one address:port */
    if (dest->daddr == saddr && dest->dport == sport && saddr == daddr && sport == dport)
        return refuse(e, verdict, ST_DROP_CONFLICT, PYLVS_V_DROP);
    if (e->nfree == 0)
        return refuse(e, verdict, ST_DROP_TABLE_FULL, PYLVS_V_DROP);

    uint32_t slot = e->free_slots[--e->nfree];
    struct conn *c = &e->conns[slot];
    c->proto = proto;
    c->caddr = saddr;
    c->cport = sport;
    c->vaddr = daddr;
    c->vport = dport;
    c->daddr = dest->daddr;
    c->dport = dest->dport;
    c->state = S_NONE;
    c->fwd = dest->fwd;
    c->svc = (uint16_t)s;
    c->dest = (uint32_t)d;
    c->in_port = in_port;
    c->expires = now + e->timeouts[S_NONE];
    memcpy(c->cmac, eth + 6, 6);
    memcpy(c->lmac, eth, 6);
    c->used = 1;
    index_insert(e, h, slot, KEY_IN);
    index_insert(e, hout, slot, KEY_OUT);
    e->conn_count++;
    e->stats[ST_CONNS_CREATED]++;
    e->dest_conns[d][C_INACTIVE] += 1;
    e->svc_stats[s][T_CONNS] += 1;
    e->dest_stats[d][T_CONNS] += 1;
    return c;
}

/* What the batch loop learnt about a frame ahead of time: its tuple and the
 * tuple's hash, computed while the index bucket was being prefetched. */
struct hint {
    uint64_t hash;
    uint32_t saddr, daddr;
    uint16_t sport, dport;
    uint8_t proto;
    uint8_t valid;
};

/* The tuple of a frame that might be TCP or UDP over IPv4, read with just
 * enough checks to stay inside the frame; the frame path validates for real
 * and uses the result only if it names the same tuple. */
HOT void frame_hint(const PylvsEngine *e, const uint8_t *f, uint32_t len, struct hint *h)
{
    h->valid = 0;
    if (len < PYLVS_VNET_HDR_LEN + 14 + 20 || pylvs_rd16(f + PYLVS_VNET_HDR_LEN + 12) != 0x0800)
        return;
    const uint8_t *ip = f + PYLVS_VNET_HDR_LEN + 14;
    uint32_t ihl = (uint32_t)(ip[0] & 0x0f) * 4;
    if (ihl < 20 || PYLVS_VNET_HDR_LEN + 14 + ihl + 4 > len)
        return;
    if (ip[9] != PROTO_TCP && ip[9] != PROTO_UDP)
        return;
    h->proto = ip[9];
    h->saddr = pylvs_rd32(ip + 12);
    h->daddr = pylvs_rd32(ip + 16);
    h->sport = pylvs_rd16(ip + ihl);
    h->dport = pylvs_rd16(ip + ihl + 2);
    h->hash = key_hash(e, h->proto, h->saddr, h->sport, h->daddr, h->dport);
    h->valid = 1;
}

/* Start loading the conn that the hinted tuple will find, assuming its
 * bucket is already on its way into the cache. */
HOT void prefetch_conn(const PylvsEngine *e, const struct hint *h)
{
    if (!h->valid)
        return;
    uint32_t tag = (uint32_t)h->hash;
    uint32_t i = tag & e->mask;
    for (int n = 0; n < 4; n++) {
        const struct bucket *b = &e->index[i];
        if (b->ref == 0)
            return;
        if (b->tag == tag) {
            __builtin_prefetch(&e->conns[(b->ref - 1) >> 1], 1);
            return;
        }
        i = (i + 1) & e->mask;
    }
}

static inline __attribute__((always_inline)) int
engine_frame(PylvsEngine *e, uint8_t *frame, uint32_t len, uint16_t in_port, double now,
             uint16_t *out_port, const struct hint *hint)
{
    e->stats[ST_RX_FRAMES]++;
    /* Only C callers get here during the scheduler upcall (process() refuses
     * re-entry): the miss path is half done, so a nested frame must not
     * touch the table. The scheduler that re-entered is at fault. */
    if (__builtin_expect(e->busy, 0))
        return finish(e, ST_SCHED_ERRORS, PYLVS_V_DROP);
    if (len < PYLVS_VNET_HDR_LEN + 14)
        return finish(e, ST_DROP_TRUNCATED, PYLVS_V_DROP);
    uint8_t *eth = frame + PYLVS_VNET_HDR_LEN;
    if (pylvs_rd16(eth + 12) != 0x0800)
        return finish(e, ST_PASS_NOT_IPV4, PYLVS_V_PASS);

    uint8_t *ip = eth + 14;
    uint32_t avail = len - (PYLVS_VNET_HDR_LEN + 14);
    if (avail < 20)
        return finish(e, ST_DROP_TRUNCATED, PYLVS_V_DROP);
    uint32_t ihl = (uint32_t)(ip[0] & 0x0f) * 4;
    if ((ip[0] >> 4) != 4 || ihl < 20 || ihl > avail)
        return finish(e, ST_DROP_BAD_IP, PYLVS_V_DROP);
    uint32_t tot = pylvs_rd16(ip + 2);
    if (tot < ihl || tot > avail)
        return finish(e, ST_DROP_BAD_IP, PYLVS_V_DROP);
    if (ihl > 20)
        e->stats[ST_IP_OPTIONS]++;
    if (pylvs_rd16(ip + 6) & 0x3fff) /* MF or a fragment offset */
        return finish(e, ST_DROP_FRAGMENT, PYLVS_V_DROP);
    uint8_t proto = ip[9];
    if (proto != PROTO_TCP && proto != PROTO_UDP)
        return finish(e, ST_PASS_NOT_OURS, PYLVS_V_PASS);

    uint8_t *l4 = ip + ihl;
    uint32_t l4len = tot - ihl;
    uint8_t tcpflags = 0;
    if (proto == PROTO_TCP) {
        if (l4len < 20)
            return finish(e, ST_DROP_BAD_L4, PYLVS_V_DROP);
        uint32_t doff = (uint32_t)(l4[12] >> 4) * 4;
        if (doff < 20 || doff > l4len)
            return finish(e, ST_DROP_BAD_L4, PYLVS_V_DROP);
        tcpflags = l4[13];
    } else {
        if (l4len < 8 || pylvs_rd16(l4 + 4) != l4len)
            return finish(e, ST_DROP_BAD_L4, PYLVS_V_DROP);
    }

    uint32_t saddr = pylvs_rd32(ip + 12), daddr = pylvs_rd32(ip + 16);
    uint16_t sport = pylvs_rd16(l4), dport = pylvs_rd16(l4 + 2);

    struct conn *c = NULL;
    int dir = KEY_IN;
    uint64_t h;
    if (hint != NULL && hint->valid && hint->proto == proto && hint->saddr == saddr &&
        hint->daddr == daddr && hint->sport == sport && hint->dport == dport)
        h = hint->hash;
    else
        h = key_hash(e, proto, saddr, sport, daddr, dport);
    struct bucket *b = index_find(e, h, proto, saddr, sport, daddr, dport);
    if (b != NULL) {
        uint32_t r = b->ref - 1;
        c = &e->conns[r >> 1];
        dir = r & 1;
        if (c->expires <= now) {
            conn_remove(e, r >> 1);
            c = NULL;
            dir = KEY_IN;
        } else if (dir == KEY_IN && c->state == S_TIME_WAIT && proto == PROTO_TCP &&
                   (tcpflags & (TH_SYN | TH_ACK | TH_RST)) == TH_SYN) {
            /* conn_reuse_mode=1: a client that reuses its port while the old
             * conn lingers in TIME_WAIT opens a new conn, scheduled afresh. */
            conn_remove(e, r >> 1);
            c = NULL;
        }
    }

    if (c == NULL) {
        int verdict;
        c = conn_new(e, proto, saddr, sport, daddr, dport, tcpflags, h, eth, in_port, now,
                     &verdict);
        if (c == NULL)
            return verdict;
        dir = KEY_IN;
    }

    if (dir == KEY_IN) {
        uint32_t d = c->dest;
        if (d >= e->ndests)
            return finish(e, ST_DROP_DEST_GONE, PYLVS_V_DROP);
        const dest_row *dest = &e->dests[d];
        if (!(dest->flags & DEST_F_USED) || dest->svc != c->svc)
            return finish(e, ST_DROP_DEST_GONE, PYLVS_V_DROP);
        if (c->fwd != FWD_MASQ)
            return finish(e, ST_DROP_FWD_METHOD, PYLVS_V_DROP);
        conn_set_state(e, c, DIR_INPUT, tcpflags, now);
        e->svc_stats[c->svc][T_INPKTS] += 1;
        e->svc_stats[c->svc][T_INBYTES] += tot;
        e->dest_stats[d][T_INPKTS] += 1;
        e->dest_stats[d][T_INBYTES] += tot;
        if (!(dest->flags & DEST_F_RESOLVED))
            return finish(e, ST_DROP_UNRESOLVED, PYLVS_V_DROP);
        pylvs_wr32(ip + 16, c->daddr);
        pylvs_wr16(l4 + 2, c->dport);
        memcpy(eth, dest->dmac, 6);
        memcpy(eth + 6, dest->smac, 6);
        fix_csums(e, frame, ip, l4, l4len, proto, daddr, c->daddr, dport, c->dport);
        *out_port = dest->out_port;
    } else {
        conn_set_state(e, c, DIR_OUTPUT, tcpflags, now);
        e->svc_stats[c->svc][T_OUTPKTS] += 1;
        e->svc_stats[c->svc][T_OUTBYTES] += tot;
        e->dest_stats[c->dest][T_OUTPKTS] += 1;
        e->dest_stats[c->dest][T_OUTBYTES] += tot;
        pylvs_wr32(ip + 12, c->vaddr);
        pylvs_wr16(l4, c->vport);
        memcpy(eth, c->cmac, 6);
        memcpy(eth + 6, c->lmac, 6);
        fix_csums(e, frame, ip, l4, l4len, proto, saddr, c->vaddr, sport, c->vport);
        *out_port = c->in_port;
    }
    return finish(e, ST_TX_FRAMES, PYLVS_V_TX);
}

int pylvs_engine_frame(PylvsEngine *e, uint8_t *frame, uint32_t len, uint16_t in_port,
                       double now, uint16_t *out_port, struct pylvs_emit *em)
{
    /* io branch only: the contract's signature so afpacket.c builds; the
     * lead's engine fills `em`. */
    (void)em;
    return engine_frame(e, frame, len, in_port, now, out_port, NULL);
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
static int get_array(PyObject *obj, const char *what, char kind, Py_ssize_t itemsize,
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
    if (get_attr_array(counters, "stats", "counters.stats", 'u', 8, "uint64", 1, stats_shape,
                       1, &e->stats_view) < 0 ||
        get_attr_array(counters, "svc_stats", "counters.svc_stats", 'u', 8, "uint64", 2,
                       traffic_shape, 1, &e->svc_stats_view) < 0 ||
        get_attr_array(counters, "dest_stats", "counters.dest_stats", 'u', 8, "uint64", 2,
                       traffic_shape, 1, &e->dest_stats_view) < 0 ||
        get_attr_array(counters, "dest_conns", "counters.dest_conns", 'i', 4, "int32", 2,
                       conns_shape, 1, &e->dest_conns_view) < 0)
        return -1;
    if (e->dest_stats_view.shape[0] != e->dest_conns_view.shape[0]) {
        PyErr_SetString(PyExc_ValueError,
                        "counters.dest_stats and counters.dest_conns must have one row per dest");
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
    release(&self->services_view);
    release(&self->dests_view);
    for (int k = 0; k < N_BATCH_ARRAYS; k++)
        release(&self->batch_views[k]);
    table_free(self->conns, (size_t)self->capacity * sizeof(struct conn));
    table_free(self->free_slots, (size_t)self->capacity * sizeof(uint32_t));
    table_free(self->index, ((size_t)self->mask + 1) * sizeof(struct bucket));
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
    self->k0 = k0;
    self->k1 = k1;
    if (load_transitions(self, transitions) < 0 || load_timeouts(self, timeouts) < 0 ||
        load_counters(self, counters) < 0)
        goto fail;
    Py_INCREF(counters);
    self->counters = counters;
    Py_INCREF(schedule);
    self->schedule = schedule;

    uint32_t cap = (uint32_t)capacity;
    uint32_t nbuckets = 16;
    while (nbuckets < 4 * cap)
        nbuckets <<= 1;
    self->capacity = cap;
    self->mask = nbuckets - 1;
    self->conns = table_alloc((size_t)cap * sizeof(struct conn));
    self->free_slots = table_alloc((size_t)cap * sizeof(uint32_t));
    self->index = table_alloc((size_t)nbuckets * sizeof(struct bucket));
    if (self->conns == NULL || self->free_slots == NULL || self->index == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    /* Slot 0 is handed out first, and a freed slot is reused before any
     * other: the reference engine allocates the same way, so the clock hand
     * meets the same conns in both. */
    for (uint32_t i = 0; i < cap; i++)
        self->free_slots[i] = cap - 1 - i;
    self->nfree = cap;
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
        PyErr_Format(PyExc_TypeError, "tables.%s no longer matches the row layout in engine.c",
                     dtype_name);
        return -1;
    }
    return 0;
}

static int get_table(PyObject *arr, const char *what, const char *dtype_name,
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

static PyObject *engine_set_tables(PylvsEngine *self, PyObject *args)
{
    static const char *const svc_fields[] = {"vaddr", "vport", "proto", "flags", NULL};
    static const Py_ssize_t svc_offsets[] = {
        offsetof(svc_row, vaddr), offsetof(svc_row, vport), offsetof(svc_row, proto),
        offsetof(svc_row, flags)};
    static const char *const dest_fields[] = {"daddr", "dport", "svc", "weight", "fwd",
                                              "flags", "out_port", "dmac", "smac", NULL};
    static const Py_ssize_t dest_offsets[] = {
        offsetof(dest_row, daddr), offsetof(dest_row, dport), offsetof(dest_row, svc),
        offsetof(dest_row, weight), offsetof(dest_row, fwd), offsetof(dest_row, flags),
        offsetof(dest_row, out_port), offsetof(dest_row, dmac), offsetof(dest_row, smac)};
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

static PyObject *engine_set_timeouts(PylvsEngine *self, PyObject *arg)
{
    if (refuse_if_busy(self) < 0 || load_timeouts(self, arg) < 0)
        return NULL;
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
    for (int k = 0; k < N_BATCH_ARRAYS; k++) {
        arrays[k] = PyObject_GetAttrString(batch, batch_arrays[k].attr);
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
    PyObject *count_obj = PyObject_GetAttrString(batch, "count");
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
    /* A three-stage pipeline over the batch, so that the two random reads
     * of a lookup (index bucket, then conn) overlap with work on other
     * frames: frame i+2D gets hashed and its bucket prefetched, frame i+D
     * gets its conn prefetched, frame i gets processed. */
    enum { D = PREFETCH_DISTANCE, RING = 4 * PREFETCH_DISTANCE };
    struct hint hints[RING];
    long tx = 0;
    for (Py_ssize_t i = -2 * D; i < count; i++) {
        Py_ssize_t j = i + 2 * D;
        if (j < count) {
            struct hint *h = &hints[j % RING];
            uint32_t lj = lens[j];
            frame_hint(self, frames + j * slot, (Py_ssize_t)lj > slot ? (uint32_t)slot : lj, h);
            if (h->valid)
                __builtin_prefetch(&self->index[(uint32_t)h->hash & self->mask]);
        }
        j = i + D;
        if (j >= 0 && j < count)
            prefetch_conn(self, &hints[j % RING]);
        if (i < 0)
            continue;
        uint16_t op = 0;
        /* Checked above, but the scheduler upcall may have written it since. */
        uint32_t li = lens[i];
        if ((Py_ssize_t)li > slot)
            li = (uint32_t)slot;
        int v = engine_frame(self, frames + i * slot, li, ports[i], now, &op,
                             &hints[i % RING]);
        verdicts[i] = (uint8_t)v;
        if (v == PYLVS_V_TX) {
            outs[i] = op;
            tx++;
        }
    }
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

static PyObject *engine_conns(PylvsEngine *self, PyObject *unused)
{
    (void)unused;
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return NULL;
    for (uint32_t i = 0; i < self->capacity; i++) {
        const struct conn *c = &self->conns[i];
        if (!c->used)
            continue;
        PyObject *t = Py_BuildValue("(BkHkHkHBdBII)", c->proto, (unsigned long)c->caddr,
                                    c->cport, (unsigned long)c->vaddr, c->vport,
                                    (unsigned long)c->daddr, c->dport, c->state, c->expires,
                                    c->fwd, (unsigned int)c->dest, (unsigned int)c->svc);
        if (t == NULL || PyList_Append(list, t) < 0) {
            Py_XDECREF(t);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(t);
    }
    return list;
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

/* _check(): verify the index against the slab (for tests): every used slot
 * indexed under both keys and found by a lookup, nothing else indexed, and
 * no entry cut off from its home bucket by an empty one. */
static PyObject *engine_check_index(PylvsEngine *self, PyObject *unused)
{
    (void)unused;
    uint64_t entries = 0;
    for (uint32_t i = 0; i <= self->mask; i++) {
        const struct bucket *b = &self->index[i];
        if (b->ref == 0)
            continue;
        entries++;
        uint32_t slot = (b->ref - 1) >> 1;
        if (slot >= self->capacity || !self->conns[slot].used) {
            PyErr_Format(PyExc_AssertionError, "bucket %u refers to free slot %u", i, slot);
            return NULL;
        }
        for (uint32_t j = b->tag & self->mask; j != i; j = (j + 1) & self->mask) {
            if (self->index[j].ref == 0) {
                PyErr_Format(PyExc_AssertionError, "bucket %u unreachable: empty bucket %u "
                             "between it and its home", i, j);
                return NULL;
            }
        }
    }
    uint32_t used = 0;
    for (uint32_t slot = 0; slot < self->capacity; slot++) {
        const struct conn *c = &self->conns[slot];
        if (!c->used)
            continue;
        used++;
        for (int dir = KEY_IN; dir <= KEY_OUT; dir++) {
            uint64_t h = conn_key_hash(self, c, dir);
            struct bucket *b =
                dir == KEY_IN
                    ? index_find(self, h, c->proto, c->caddr, c->cport, c->vaddr, c->vport)
                    : index_find(self, h, c->proto, c->daddr, c->dport, c->caddr, c->cport);
            if (b == NULL || b->ref != ((slot << 1 | (uint32_t)dir) + 1) ||
                b->tag != (uint32_t)h) {
                PyErr_Format(PyExc_AssertionError, "conn in slot %u not found by its %s key",
                             slot, dir == KEY_IN ? "IN" : "OUT");
                return NULL;
            }
        }
    }
    if (used != self->conn_count || entries != 2 * (uint64_t)used ||
        self->nfree != self->capacity - used) {
        PyErr_Format(PyExc_AssertionError,
                     "%u conns used, conn_count %u, %llu index entries, %u free slots", used,
                     self->conn_count, (unsigned long long)entries, self->nfree);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *engine_get_conn_count(PylvsEngine *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLong(self->conn_count);
}

static PyObject *engine_get_capacity(PylvsEngine *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLong(self->capacity);
}

static PyMethodDef engine_methods[] = {
    {"set_tables", (PyCFunction)engine_set_tables, METH_VARARGS,
     "set_tables(services, dests): use these SERVICE_DTYPE / DEST_DTYPE arrays from now on."},
    {"set_timeouts", (PyCFunction)engine_set_timeouts, METH_O,
     "set_timeouts(timeouts): float64[12] seconds per state (UDP last)."},
    {"process", (PyCFunction)engine_process, METH_VARARGS,
     "process(batch, now) -> int: handle batch.count frames in place; returns the V_TX count."},
    {"expire", (PyCFunction)engine_expire, METH_VARARGS,
     "expire(now, budget) -> int: advance the clock hand budget slots, removing dead conns."},
    {"conns", (PyCFunction)engine_conns, METH_NOARGS,
     "conns() -> list of (proto, caddr, cport, vaddr, vport, daddr, dport, state, expires,\n"
     "fwd, dest_slot, svc_slot), in slab order."},
    {"_key_hash", (PyCFunction)engine_key_hash, METH_VARARGS, NULL},
    {"_check", (PyCFunction)engine_check_index, METH_NOARGS, NULL},
    {NULL},
};

static PyGetSetDef engine_getset[] = {
    {"conn_count", (getter)engine_get_conn_count, NULL, "conns in the table", NULL},
    {"capacity", (getter)engine_get_capacity, NULL, "the most conns the table holds", NULL},
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
