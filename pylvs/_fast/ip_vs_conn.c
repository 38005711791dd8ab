/* The conn table (the kernel's ip_vs_conn.c): one slab of conns and one
 * open-addressing index over it (linear probing, backward-shift deletion,
 * keyed SipHash-1-3). Each conn sits in the index twice: under its IN key
 * (client -> VIP) and its OUT key (real server -> client), so one probe
 * classifies a frame's direction. Lookups are inline in ip_vs.h.
 */
#include "ip_vs.h"

#include <stdlib.h>
#include <sys/mman.h>

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

int conn_table_init(PylvsEngine *e, uint32_t cap)
{
    uint32_t nbuckets = 16;
    while (nbuckets < 4 * cap)
        nbuckets <<= 1;
    e->capacity = cap;
    e->mask = nbuckets - 1;
    e->conns = table_alloc((size_t)cap * sizeof(struct conn));
    e->free_slots = table_alloc((size_t)cap * sizeof(uint32_t));
    e->index = table_alloc((size_t)nbuckets * sizeof(struct bucket));
    if (e->conns == NULL || e->free_slots == NULL || e->index == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    /* Slot 0 is handed out first, and a freed slot is reused before any
     * other: the reference engine allocates the same way, so the clock hand
     * meets the same conns in both. */
    for (uint32_t i = 0; i < cap; i++)
        e->free_slots[i] = cap - 1 - i;
    e->nfree = cap;
    return 0;
}

void conn_table_free(PylvsEngine *e)
{
    table_free(e->conns, (size_t)e->capacity * sizeof(struct conn));
    table_free(e->free_slots, (size_t)e->capacity * sizeof(uint32_t));
    table_free(e->index, ((size_t)e->mask + 1) * sizeof(struct bucket));
    e->conns = NULL;
    e->free_slots = NULL;
    e->index = NULL;
}

/* The load stays <= 1/2, so an empty bucket is always found. */
void index_insert(PylvsEngine *e, uint64_t h, uint32_t slot, int dir)
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

void conn_remove(PylvsEngine *e, uint32_t slot)
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


/* For tests (Engine._check): every used slot
 * indexed under both keys and found by a lookup, nothing else indexed, and
 * no entry cut off from its home bucket by an empty one. */
int conn_table_check(PylvsEngine *self)
{
    uint64_t entries = 0;
    for (uint32_t i = 0; i <= self->mask; i++) {
        const struct bucket *b = &self->index[i];
        if (b->ref == 0)
            continue;
        entries++;
        uint32_t slot = (b->ref - 1) >> 1;
        if (slot >= self->capacity || !self->conns[slot].used) {
            PyErr_Format(PyExc_AssertionError, "bucket %u refers to free slot %u", i, slot);
            return -1;
        }
        for (uint32_t j = b->tag & self->mask; j != i; j = (j + 1) & self->mask) {
            if (self->index[j].ref == 0) {
                PyErr_Format(PyExc_AssertionError, "bucket %u unreachable: empty bucket %u "
                             "between it and its home", i, j);
                return -1;
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
                return -1;
            }
        }
    }
    if (used != self->conn_count || entries != 2 * (uint64_t)used ||
        self->nfree != self->capacity - used) {
        PyErr_Format(PyExc_AssertionError,
                     "%u conns used, conn_count %u, %llu index entries, %u free slots", used,
                     self->conn_count, (unsigned long long)entries, self->nfree);
        return -1;
    }
    return 0;
}
