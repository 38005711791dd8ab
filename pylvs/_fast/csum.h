/* Internet checksum arithmetic (RFC 1071, RFC 1624) on host-order words.
 *
 * Values are the 16-bit fields as read big-endian; ones' complement sums do
 * not depend on byte order, so only the bulk sum reads memory natively and
 * swaps once at the end.
 */
#ifndef PYLVS_CSUM_H
#define PYLVS_CSUM_H

#include <stdint.h>
#include <string.h>

/* Forced: these sit on the per-frame path inside one large function. */
#define PYLVS_INLINE static inline __attribute__((always_inline))

PYLVS_INLINE uint16_t pylvs_rd16(const uint8_t *p)
{
    return (uint16_t)((p[0] << 8) | p[1]);
}

PYLVS_INLINE uint32_t pylvs_rd32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return __builtin_bswap32(v);
}

PYLVS_INLINE void pylvs_wr16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

PYLVS_INLINE void pylvs_wr32(uint8_t *p, uint32_t v)
{
    v = __builtin_bswap32(v);
    memcpy(p, &v, 4);
}

/* End-around carry down to 16 bits. Zero comes out only if every summand
 * was zero, which is what keeps eqn. 3 of RFC 1624 free of the -0 trap. */
PYLVS_INLINE uint16_t pylvs_fold(uint64_t s)
{
    s = (s & 0xffffffffu) + (s >> 32);
    s = (s & 0xffffu) + (s >> 16);
    s = (s & 0xffffu) + (s >> 16);
    s = (s & 0xffffu) + (s >> 16);
    return (uint16_t)s;
}

/* The ones' complement difference (new - old) of a 32-bit field, to add to
 * a sum: ~old + new per 16-bit half. */
PYLVS_INLINE uint64_t pylvs_delta32(uint32_t old, uint32_t new_)
{
    return (uint64_t)(~old >> 16 & 0xffff) + (~old & 0xffff) + (new_ >> 16) + (new_ & 0xffff);
}

PYLVS_INLINE uint64_t pylvs_delta16(uint16_t old, uint16_t new_)
{
    return (uint64_t)(uint16_t)~old + new_;
}

/* RFC 1624 eqn. 3: HC' = ~(~HC + delta), for a checksum field (complemented sum).
 * `delta` is a sum of a few pylvs_delta* terms (far below 2^32 - 2^16), so
 * two end-around carries fold it; zero still only comes from all-zero
 * summands. */
PYLVS_INLINE uint16_t pylvs_csum_update(uint16_t csum, uint64_t delta)
{
    uint32_t s = (uint32_t)((uint16_t)~csum + delta);
    s = (s & 0xffffu) + (s >> 16);
    s = (s & 0xffffu) + (s >> 16);
    return (uint16_t)~s;
}

/* The delta of a TTL decremented by one: the header word (TTL << 8 |
 * protocol) loses 0x100, and ~old + (old - 0x100) = 0xffff - 0x100 for any
 * old word with TTL >= 1. */
#define PYLVS_TTL_DEC_DELTA 0xfeffu

/* Ones' complement sum of a byte range, as a host-order 16-bit value. */
PYLVS_INLINE uint16_t pylvs_csum_bytes(const uint8_t *p, uint32_t len)
{
    uint64_t s = 0;
    uint32_t i = 0;
    for (; i + 16 <= len; i += 16) {
        uint32_t w[4];
        memcpy(w, p + i, 16);
        s += (uint64_t)w[0] + w[1] + w[2] + w[3];
    }
    for (; i + 4 <= len; i += 4) {
        uint32_t w;
        memcpy(&w, p + i, 4);
        s += w;
    }
    if (i + 2 <= len) {
        uint16_t w;
        memcpy(&w, p + i, 2);
        s += w;
        i += 2;
    }
    if (i < len) {
        /* the odd last byte is the high byte of a zero-padded big-endian word */
        uint8_t pad[2] = {p[i], 0};
        uint16_t w;
        memcpy(&w, pad, 2);
        s += w;
    }
    uint16_t native = pylvs_fold(s);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    return native;
#else
    return __builtin_bswap16(native);
#endif
}

#endif
