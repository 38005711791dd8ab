/* What a random read costs by the address space it ranges over: the probe
 * behind bench/README.md, "table-scale" (where the established lookup's
 * time goes at 10 M flows).
 *
 *   cc -O2 -o /tmp/pagewalk bench/pagewalk.c
 *   /tmp/pagewalk MIB STRIDE HUGE
 *
 * Maps MIB MiB (MADV_HUGEPAGE if HUGE is 1, MADV_NOHUGEPAGE if 0), touches
 * it all, then reads 8 Mi random lines among those at multiples of STRIDE
 * bytes, each prefetched 16 reads ahead as the engine's pipeline does, and
 * prints the best of three passes in ns per read. STRIDE 64 reads any line;
 * STRIDE 4096 one line per 4 KiB page, so the lines read fit the caches
 * (MIB / 64 of them) while the pages they lie in span all of MIB: a cost
 * that follows the pages, not the bytes, is address translation (TLB
 * misses and page walks), not DRAM.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define READS (1u << 23)
#define AHEAD 16

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static uint64_t xorshift(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s MIB STRIDE HUGE(0|1)\n", argv[0]);
        return 2;
    }
    size_t size = (size_t)atol(argv[1]) << 20, stride = (size_t)atol(argv[2]);
    int huge = atoi(argv[3]);
    if (size == 0 || stride < 64 || stride > size) {
        fprintf(stderr, "MIB > 0, 64 <= STRIDE <= MIB MiB\n");
        return 2;
    }
    char *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint64_t *at = malloc(READS * sizeof *at);
    if (p == MAP_FAILED || at == NULL) {
        perror("memory");
        return 1;
    }
    madvise(p, size, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    memset(p, 1, size);
    uint64_t s = 88172645463325252ull;
    size_t places = size / stride;
    for (size_t i = 0; i < READS; i++)
        at[i] = xorshift(&s) % places * stride;
    double best = 1e9;
    uint64_t sum = 0;
    for (int pass = 0; pass < 3; pass++) {
        double t = now();
        for (size_t i = 0; i < READS; i++) {
            __builtin_prefetch(p + at[(i + AHEAD) & (READS - 1)]);
            sum += *(volatile uint64_t *)(p + at[i]);
        }
        double ns = (now() - t) / READS * 1e9;
        if (ns < best)
            best = ns;
    }
    printf("%zu MiB, stride %zu, %s pages: %.1f ns per prefetched random read "
           "(%zu lines read from, %zu pages of 4 KiB) [%llu]\n",
           size >> 20, stride, huge ? "huge" : "4 KiB", best, places,
           stride >= 4096 ? places : size / 4096, (unsigned long long)(sum & 1));
    return 0;
}
