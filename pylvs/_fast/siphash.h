/* SipHash (Aumasson & Bernstein), the keyed hash of the conn index.
 *
 * The conn index is keyed so that clients, who choose caddr and cport,
 * cannot aim many flows at one probe run. SipHash-1-3 (one compression
 * round, three finalization rounds) is what CPython uses for str hashing:
 * enough against flooding, and cheap for a 13-byte tuple.
 */
#ifndef PYLVS_SIPHASH_H
#define PYLVS_SIPHASH_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define PYLVS_ROTL64(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))

/* One SipRound with the rotation `rotl`: scalar words, or vectors of them. */
#define PYLVS_SIPROUND_R(v0, v1, v2, v3, rotl)                               \
    do {                                                                     \
        v0 += v1; v1 = rotl(v1, 13); v1 ^= v0; v0 = rotl(v0, 32);            \
        v2 += v3; v3 = rotl(v3, 16); v3 ^= v2;                               \
        v0 += v3; v3 = rotl(v3, 21); v3 ^= v0;                               \
        v2 += v1; v1 = rotl(v1, 17); v1 ^= v2; v2 = rotl(v2, 32);            \
    } while (0)
#define PYLVS_SIPROUND(v0, v1, v2, v3) PYLVS_SIPROUND_R(v0, v1, v2, v3, PYLVS_ROTL64)

static inline uint64_t pylvs_le64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

/* Any length, any round counts: used to check the implementation against
 * the paper's SipHash-2-4 test vector, and as the slow twin of the fast
 * two-word path below. */
static inline uint64_t pylvs_siphash(uint64_t k0, uint64_t k1, const uint8_t *data,
                                     size_t len, int crounds, int drounds)
{
    uint64_t v0 = k0 ^ 0x736f6d6570736575ULL;
    uint64_t v1 = k1 ^ 0x646f72616e646f6dULL;
    uint64_t v2 = k0 ^ 0x6c7967656e657261ULL;
    uint64_t v3 = k1 ^ 0x7465646279746573ULL;
    size_t whole = len & ~(size_t)7;
    for (size_t i = 0; i < whole; i += 8) {
        uint64_t m = pylvs_le64(data + i);
        v3 ^= m;
        for (int r = 0; r < crounds; r++)
            PYLVS_SIPROUND(v0, v1, v2, v3);
        v0 ^= m;
    }
    uint64_t last = (uint64_t)(len & 0xff) << 56;
    for (size_t i = 0; i < (len & 7); i++)
        last |= (uint64_t)data[whole + i] << (8 * i);
    v3 ^= last;
    for (int r = 0; r < crounds; r++)
        PYLVS_SIPROUND(v0, v1, v2, v3);
    v0 ^= last;
    v2 ^= 0xff;
    for (int r = 0; r < drounds; r++)
        PYLVS_SIPROUND(v0, v1, v2, v3);
    return v0 ^ v1 ^ v2 ^ v3;
}

/* SipHash-1-3 of a message of 8 < len < 16 bytes already split into its two
 * little-endian words, m1 carrying the length in its top byte. */
static inline __attribute__((always_inline)) uint64_t
pylvs_siphash13_2w(uint64_t k0, uint64_t k1, uint64_t m0, uint64_t m1)
{
    uint64_t v0 = k0 ^ 0x736f6d6570736575ULL;
    uint64_t v1 = k1 ^ 0x646f72616e646f6dULL;
    uint64_t v2 = k0 ^ 0x6c7967656e657261ULL;
    uint64_t v3 = k1 ^ 0x7465646279746573ULL;
    v3 ^= m0;
    PYLVS_SIPROUND(v0, v1, v2, v3);
    v0 ^= m0;
    v3 ^= m1;
    PYLVS_SIPROUND(v0, v1, v2, v3);
    v0 ^= m1;
    v2 ^= 0xff;
    PYLVS_SIPROUND(v0, v1, v2, v3);
    PYLVS_SIPROUND(v0, v1, v2, v3);
    PYLVS_SIPROUND(v0, v1, v2, v3);
    return v0 ^ v1 ^ v2 ^ v3;
}

/* Eight independent messages for pylvs_siphash13_2w_x8, lane k of each
 * vector being message k (GCC vector extensions: one AVX-512 register
 * where the CPU has them, pairs of SSE registers elsewhere). */
typedef uint64_t pylvs_u64x8 __attribute__((vector_size(64)));
#define PYLVS_VROTL64(x, b) (((x) << (b)) | ((x) >> (64 - (b))))

/* pylvs_siphash13_2w of eight messages at once, lane by lane the same
 * function: the batch path hashes its frames' tuples eight at a time (a
 * SipRound is 14 dependent scalar steps; eight lanes of it cost about what
 * one does). Defined in ip_vs_conn.c, built for AVX-512 and for any
 * x86-64 and picked when the library loads. */
void pylvs_siphash13_2w_x8(uint64_t k0, uint64_t k1, const pylvs_u64x8 *m0,
                           const pylvs_u64x8 *m1, pylvs_u64x8 *out);

#endif
