/* The conn table (the kernel's ip_vs_conn.c): one slab of conns and one
 * open-addressing index over it (linear probing, backward-shift deletion,
 * keyed SipHash-1-3). Each conn sits in the index under its IN key (client
 * -> VIP) and, for NAT conns only, its OUT key (real server -> client), so
 * one probe classifies a frame's direction. Lookups are inline in ip_vs.h.
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

static size_t round_up(size_t n, size_t unit)
{
    return (n + unit - 1) / unit * unit;
}

int conn_table_init(PylvsEngine *e, uint32_t cap)
{
    e->capacity = cap;
    e->high = 0;
    e->free_head = NO_SLOT;
    e->rng = e->k0 ^ e->k1;
    /* Address space only: PROT_NONE pages cost no memory and no commit
     * charge until slab_grow makes them usable. */
    e->slab_size = round_up((size_t)cap * sizeof(struct conn), SLAB_PAGE);
    size_t align = e->slab_size >= SLAB_UNIT ? SLAB_UNIT : SLAB_PAGE;
    e->slab_map_len = round_up(e->slab_size, align) + (align > SLAB_PAGE ? align : 0);
    void *m = mmap(NULL, e->slab_map_len, PROT_NONE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
        e->slab_map = NULL;
        PyErr_NoMemory();
        return -1;
    }
    e->slab_map = m;
    e->conns = (struct conn *)round_up((uintptr_t)m, align);
    e->slab_ready = 0;
    e->mask = INDEX_MIN - 1;
    e->index = table_alloc((size_t)INDEX_MIN * sizeof(struct bucket));
    if (e->index == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

void conn_table_free(PylvsEngine *e)
{
    if (e->slab_map != NULL)
        munmap(e->slab_map, e->slab_map_len);
    table_free(e->index, ((size_t)e->mask + 1) * sizeof(struct bucket));
    e->slab_map = NULL;
    e->conns = NULL;
    e->index = NULL;
}

size_t conn_table_memory(const PylvsEngine *e)
{
    return e->slab_ready + ((size_t)e->mask + 1) * sizeof(struct bucket);
}

/* Make slots [0, slots) usable, a SLAB_UNIT at a time. */
static int slab_grow(PylvsEngine *e, uint32_t slots)
{
    size_t need = (size_t)slots * sizeof(struct conn);
    if (need <= e->slab_ready)
        return 0;
    size_t target = round_up(need, SLAB_UNIT);
    if (target > e->slab_size)
        target = e->slab_size;
    uint8_t *at = (uint8_t *)e->conns + e->slab_ready;
    if (mprotect(at, target - e->slab_ready, PROT_READ | PROT_WRITE) != 0)
        return -1;
#ifdef MADV_HUGEPAGE
    if (target - e->slab_ready >= SLAB_UNIT)
        madvise(at, target - e->slab_ready, MADV_HUGEPAGE);
#endif
    e->slab_ready = target;
    return 0;
}

/* Double the index until it holds INDEX_PER_CONN x `conns` buckets, moving
 * every entry by its tag; no key is hashed again. */
static int index_grow(PylvsEngine *e, uint32_t conns)
{
    uint64_t need = INDEX_PER_CONN * (uint64_t)conns;
    uint64_t n = (uint64_t)e->mask + 1;
    if (need <= n)
        return 0;
    uint64_t nn = n;
    while (nn < need)
        nn <<= 1;
    struct bucket *old = e->index, *idx = table_alloc((size_t)nn * sizeof(struct bucket));
    if (idx == NULL)
        return -1;
    uint32_t mask = (uint32_t)(nn - 1);
    for (uint64_t i = 0; i < n; i++) {
        if (old[i].ref == 0)
            continue;
        uint32_t j = old[i].tag & mask;
        while (idx[j].ref != 0)
            j = (j + 1) & mask;
        idx[j] = old[i];
    }
    e->index = idx;
    e->mask = mask;
    table_free(old, (size_t)n * sizeof(struct bucket));
    return 0;
}

/* splitmix64 (Steele, Lea, Flood 2014): the reference engine draws the same
 * numbers from the same state. */
static uint64_t rng_next(PylvsEngine *e)
{
    uint64_t z = (e->rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* A template: never while it controls conns; else first when no conn of
 * it ever got established or answered (not ASSURED: the kernel's
 * ip_vs_random_dropentry drops those too), else with the second class. */
static int tpl_evict_class(const struct conn *c)
{
    if (c->control != 0)
        return -1;
    return c->state & CTPL_S_ASSURED ? 1 : 0;
}

/* 0: reclaimed first (dead, TIME_WAIT, CLOSE, or never answered by the real
 * server while not ESTABLISHED); 1: other non-ESTABLISHED; -1: never
 * (ESTABLISHED). */
static int evict_class(const struct conn *c, double now)
{
    if (c->flags & CONN_F_TEMPLATE)
        return tpl_evict_class(c);
    if (c->expires <= now)
        return 0;
    if (c->proto == PROTO_TCP) {
        if (c->state == S_ESTABLISHED)
            return -1;
        if (c->state == S_TIME_WAIT || c->state == S_CLOSE)
            return 0;
    }
    return c->replied ? 1 : 0;
}

int64_t conn_victim(PylvsEngine *e, double now)
{
    /* The lowest class drawn, and in it the conn idle longest (its last
     * packet: expires less its state's timeout): under a flood the oldest
     * half-open entry, among TIME_WAIT ones the oldest, and a conn whose
     * handshake is running now is not taken while an older one is drawn.
     * A dead conn ends the draws: none is better. */
    int64_t best = -1;
    int best_k = 2;
    double best_seen = 0;
    for (int n = 0; n < EVICT_SAMPLES; n++) {
        uint32_t slot = (uint32_t)(((rng_next(e) >> 32) * (uint64_t)e->high) >> 32);
        const struct conn *c = &e->conns[slot];
        if (c->expires <= now && !tpl_held(c))
            return slot;
        int k = evict_class(c, now);
        double seen = c->expires - e->timeouts[c->state];
        if (k >= 0 && (k < best_k || (k == best_k && seen < best_seen))) {
            best = slot;
            best_k = k;
            best_seen = seen;
        }
    }
    return best;
}

uint32_t conn_alloc(PylvsEngine *e, int64_t victim, double now)
{
    if (conn_table_full(e)) {
        if (victim < 0 || (uint64_t)victim >= e->high || !e->conns[victim].used)
            return NO_SLOT;
        const struct conn *v = &e->conns[victim];
        conn_remove(e, (uint32_t)victim, v->expires <= now ? ST_CONNS_EXPIRED : ST_CONNS_EVICTED);
    }
    if (index_grow(e, e->conn_count + 1) < 0)
        return NO_SLOT;
    uint32_t slot = e->free_head;
    if (slot != NO_SLOT) {
        e->free_head = e->conns[slot].dest;
        return slot;
    }
    if (e->high >= e->capacity || slab_grow(e, e->high + 1) < 0)
        return NO_SLOT;
    return e->high++;
}

/* The load stays <= 2/3, so an empty bucket is always found. */
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

void conn_remove(PylvsEngine *e, uint32_t slot, int stat)
{
    struct conn *c = &e->conns[slot];
    if (!(c->flags & CONN_F_UNHASHED))
        index_delete(e, conn_key_hash(e, c, KEY_IN), (slot << 1 | KEY_IN) + 1);
    if (conn_has_out_key(c))
        index_delete(e, conn_key_hash(e, c, KEY_OUT), (slot << 1 | KEY_OUT) + 1);
    if (c->dest < e->max_dests) {
        if (c->flags & CONN_F_TEMPLATE)
            dest_persist_add(e, c->dest, -1);
        else
            dest_conns_add(e, c->dest, state_active(c->state) ? C_ACTIVE : C_INACTIVE, -1);
        dest_overload_unbind(e, c->dest);
    }
    if (!(c->flags & CONN_F_TEMPLATE) && c->control != 0)
        e->conns[c->control - 1].control--; /* ip_vs_control_del */
    c->used = 0;
    c->dest = e->free_head;
    e->free_head = slot;
    e->conn_count--;
    e->stats[stat]++;
}

void conn_unhash(PylvsEngine *e, uint32_t slot)
{
    struct conn *c = &e->conns[slot];
    if (c->flags & CONN_F_UNHASHED)
        return;
    index_delete(e, conn_key_hash(e, c, KEY_IN), (slot << 1 | KEY_IN) + 1);
    c->flags |= CONN_F_UNHASHED;
    c->cport = 0;
    c->vport = 0xffff;
    c->dport = 0xffff;
}

long pylvs_engine_expire(PylvsEngine *e, double now, long budget)
{
    uint32_t high = e->high;
    if (budget <= 0 || high == 0 || e->busy)
        return 0;
    /* The hand ends where `budget` single steps would leave it, but a slot
     * is never visited twice in one call: a second lap finds nothing more. */
    uint32_t visits = (unsigned long)budget < high ? (uint32_t)budget : high;
    uint32_t start = e->hand;
    long expired = 0;
    uint32_t pos = start;
    for (uint32_t n = 0; n < visits; n++) {
        struct conn *c = &e->conns[pos];
        if (c->used && c->expires <= now) {
            if (tpl_held(c)) {
                /* ip_vs_conn_expire: a template that controls conns waits
                 * again, and from now on by this timeout. */
                c->tpl_timeout = TPL_LATE_TIMEOUT;
                c->expires = now + TPL_LATE_TIMEOUT;
            } else {
                conn_remove(e, pos, ST_CONNS_EXPIRED);
                expired++;
            }
        }
        if (++pos == high)
            pos = 0;
    }
    e->hand = (uint32_t)((start + (unsigned long)budget % high) % high);
    return expired;
}

/* Every conn's `control` names a used template, and every template's count
 * is the number of conns naming it. */
static int tpl_check(PylvsEngine *self)
{
    for (uint32_t slot = 0; slot < self->high; slot++) {
        const struct conn *c = &self->conns[slot];
        if (!c->used || !(c->flags & CONN_F_TEMPLATE))
            continue;
        uint32_t n = 0;
        for (uint32_t i = 0; i < self->high; i++) {
            const struct conn *o = &self->conns[i];
            n += o->used && !(o->flags & CONN_F_TEMPLATE) && o->control == slot + 1;
        }
        if (n != c->control) {
            PyErr_Format(PyExc_AssertionError, "template in slot %u controls %u conns, "
                         "counts %u", slot, n, c->control);
            return -1;
        }
    }
    for (uint32_t slot = 0; slot < self->high; slot++) {
        const struct conn *c = &self->conns[slot];
        if (!c->used || (c->flags & CONN_F_TEMPLATE) || c->control == 0)
            continue;
        const struct conn *t = c->control - 1 < self->high ? &self->conns[c->control - 1] : NULL;
        if (t == NULL || !t->used || !(t->flags & CONN_F_TEMPLATE)) {
            PyErr_Format(PyExc_AssertionError, "conn in slot %u names no template", slot);
            return -1;
        }
    }
    return 0;
}

/* The kernel's todrop_entry: a conn whose last packet is less than 60 s old
 * stays (now + its state's timeout < expires + 60), so does one with no
 * or more than 8 client packets; of those with i (1..8), every i-th met
 * goes, the first at once (one countdown per i, kept across calls). */
static int todrop_entry(PylvsEngine *e, const struct conn *c, double now)
{
    if (now + e->timeouts[c->state] < c->expires + 60.0)
        return 0;
    uint32_t i = c->in_pkts;
    if (i == 0 || i > 8)
        return 0;
    if (--e->todrop_counter[i] > 0)
        return 0;
    e->todrop_counter[i] = (int8_t)i;
    return 1;
}

long conn_drop_entries(PylvsEngine *e, double now)
{
    /* The kernel scans 1/32 of its hash buckets at random each second:
     * each conn is looked at with chance 1/32. Here a slot of [0, high) is
     * drawn ceil(high / 32) times (e->rng, as eviction); free slots and
     * dead conns (expiry's business) are passed over. Half-open TCP
     * (SYN_RECV, SYNACK) goes at once; ESTABLISHED TCP and every UDP conn
     * as todrop_entry says; other TCP states stay. */
    uint32_t high = e->high;
    uint32_t draws = (uint32_t)(((uint64_t)high + 31) >> 5);
    long dropped = 0;
    for (uint32_t n = 0; n < draws; n++) {
        uint32_t slot = (uint32_t)(((rng_next(e) >> 32) * (uint64_t)high) >> 32);
        const struct conn *c = &e->conns[slot];
        /* Templates stay (ip_vs_random_dropentry passes over them): their
         * clients would lose persistence, and they hold no state to free. */
        if (!c->used || c->expires <= now || (c->flags & CONN_F_TEMPLATE))
            continue;
        int drop;
        if (c->proto == PROTO_TCP)
            drop = c->state == S_SYN_RECV || c->state == S_SYNACK ||
                   (c->state == S_ESTABLISHED && todrop_entry(e, c, now));
        else
            drop = todrop_entry(e, c, now);
        if (drop) {
            conn_remove(e, slot, ST_CONNS_DROPPED);
            dropped++;
        }
    }
    return dropped;
}

/* For tests (Engine._check): every used slot indexed under its keys (IN, and
 * OUT for NAT conns) and
 * found by a lookup, nothing else indexed, no entry cut off from its home
 * bucket by an empty one, the free list exactly the unused slots below
 * high, and INDEX_PER_CONN buckets or more per conn. */
int conn_table_check(PylvsEngine *self)
{
    uint64_t entries = 0;
    for (uint32_t i = 0; i <= self->mask; i++) {
        const struct bucket *b = &self->index[i];
        if (b->ref == 0)
            continue;
        entries++;
        uint32_t slot = (b->ref - 1) >> 1;
        if (slot >= self->high || !self->conns[slot].used) {
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
    uint64_t keys = 0;
    if (tpl_check(self) < 0)
        return -1;
    for (uint32_t slot = 0; slot < self->high; slot++) {
        const struct conn *c = &self->conns[slot];
        if (!c->used)
            continue;
        used++;
        int first = c->flags & CONN_F_UNHASHED ? KEY_OUT : KEY_IN;
        int last = conn_has_out_key(c) ? KEY_OUT : KEY_IN;
        keys += (uint64_t)(last - first + 1);
        for (int dir = first; dir <= last; dir++) {
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
    uint32_t nfree = 0;
    for (uint32_t s = self->free_head; s != NO_SLOT; s = self->conns[s].dest) {
        if (s >= self->high || self->conns[s].used || ++nfree > self->high) {
            PyErr_Format(PyExc_AssertionError, "free list holds slot %u (high %u)", s,
                         self->high);
            return -1;
        }
    }
    if (used != self->conn_count || entries != keys ||
        nfree != self->high - used || INDEX_PER_CONN * (uint64_t)used > (uint64_t)self->mask + 1) {
        PyErr_Format(PyExc_AssertionError,
                     "%u conns used, conn_count %u, %llu index entries in %u buckets, "
                     "%u free slots below high %u", used, self->conn_count,
                     (unsigned long long)entries, self->mask + 1, nfree, self->high);
        return -1;
    }
    return 0;
}

/* siphash.h. target_clones makes an AVX-512 and a baseline body and an
 * ifunc that picks one when the library is loaded. */
__attribute__((target_clones("avx512f", "avx2", "default"))) void
pylvs_siphash13_2w_x8(uint64_t k0, uint64_t k1, const pylvs_u64x8 *m0, const pylvs_u64x8 *m1,
                      pylvs_u64x8 *out)
{
    const pylvs_u64x8 zero = {0};
    pylvs_u64x8 v0 = zero + (k0 ^ 0x736f6d6570736575ULL);
    pylvs_u64x8 v1 = zero + (k1 ^ 0x646f72616e646f6dULL);
    pylvs_u64x8 v2 = zero + (k0 ^ 0x6c7967656e657261ULL);
    pylvs_u64x8 v3 = zero + (k1 ^ 0x7465646279746573ULL);
    v3 ^= *m0;
    PYLVS_SIPROUND_R(v0, v1, v2, v3, PYLVS_VROTL64);
    v0 ^= *m0;
    v3 ^= *m1;
    PYLVS_SIPROUND_R(v0, v1, v2, v3, PYLVS_VROTL64);
    v0 ^= *m1;
    v2 ^= 0xff;
    PYLVS_SIPROUND_R(v0, v1, v2, v3, PYLVS_VROTL64);
    PYLVS_SIPROUND_R(v0, v1, v2, v3, PYLVS_VROTL64);
    PYLVS_SIPROUND_R(v0, v1, v2, v3, PYLVS_VROTL64);
    *out = v0 ^ v1 ^ v2 ^ v3;
}
