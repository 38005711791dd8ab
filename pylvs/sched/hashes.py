"""The kernel's hash functions that choose sh, dh and mh table slots.

Written from their definitions, so tables and picks match a kernel
director's for the same dests and packets (x86-64, the generic hash_32).

- ``hash_32(val, bits)``: include/linux/hash.h, ``(val * GOLDEN_RATIO_32)
  >> (32 - bits)`` on 32 bits, GOLDEN_RATIO_32 = 0x61C88647.
- ``siphash13(k0, k1, data)``: SipHash-1-3 (one compression round, three
  finalisation rounds), 64-bit result, key words k0, k1 (u64).
- ``hsiphash_u32(key, v)``: lib/siphash.c's hsiphash() of a 4-byte u32 on a
  64-bit kernel, which is SipHash-1-3 with the two u64 key words, cut to its
  low 32 bits. The u32 is hashed in memory order (little-endian on x86).
"""

from __future__ import annotations

import numpy as np

GOLDEN_RATIO_32 = 0x61C88647
U32 = 0xFFFFFFFF
U64 = 0xFFFFFFFFFFFFFFFF

# "somepseudorandomlygeneratedbytes", SipHash's initial state.
_SIP_C = (0x736F6D6570736575, 0x646F72616E646F6D, 0x6C7967656E657261, 0x7465646279746573)


def hash_32(val: int, bits: int) -> int:
    """The kernel's hash_32: the top ``bits`` bits of val * GOLDEN_RATIO_32 (u32)."""
    return ((val * GOLDEN_RATIO_32) & U32) >> (32 - bits)


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & U64


def _round(v0: int, v1: int, v2: int, v3: int) -> tuple[int, int, int, int]:
    v0 = (v0 + v1) & U64
    v1 = _rotl(v1, 13) ^ v0
    v0 = _rotl(v0, 32)
    v2 = (v2 + v3) & U64
    v3 = _rotl(v3, 16) ^ v2
    v0 = (v0 + v3) & U64
    v3 = _rotl(v3, 21) ^ v0
    v2 = (v2 + v1) & U64
    v1 = _rotl(v1, 17) ^ v2
    v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


def siphash13(k0: int, k1: int, data: bytes) -> int:
    """SipHash-1-3 of ``data`` under the key (k0, k1): a u64."""
    v0, v1, v2, v3 = _SIP_C[0] ^ k0, _SIP_C[1] ^ k1, _SIP_C[2] ^ k0, _SIP_C[3] ^ k1
    n = len(data)
    full = n - n % 8
    for i in range(0, full, 8):
        m = int.from_bytes(data[i:i + 8], "little")
        v3 ^= m
        v0, v1, v2, v3 = _round(v0, v1, v2, v3)
        v0 ^= m
    b = ((n & 0xFF) << 56) | int.from_bytes(data[full:], "little")
    v3 ^= b
    v0, v1, v2, v3 = _round(v0, v1, v2, v3)
    v0 ^= b
    v2 ^= 0xFF
    for _ in range(3):
        v0, v1, v2, v3 = _round(v0, v1, v2, v3)
    return v0 ^ v1 ^ v2 ^ v3


def hsiphash_u32(key: tuple[int, int], v: int) -> int:
    """hsiphash(&v, 4, key) of a u32 on a 64-bit kernel: siphash13 of the
    4 little-endian bytes of v, cut to 32 bits. Unrolled (the upcall of mh
    hashes each new client): one message word, b = 4 << 56 | v."""
    k0, k1 = key
    v0, v1, v2, v3 = _SIP_C[0] ^ k0, _SIP_C[1] ^ k1, _SIP_C[2] ^ k0, _SIP_C[3] ^ k1
    b = (4 << 56) | (v & U32)
    v3 ^= b
    for r in range(4):
        if r == 1:
            v0 ^= b
            v2 ^= 0xFF
        v0 = (v0 + v1) & U64
        v1 = ((v1 << 13) | (v1 >> 51)) & U64 ^ v0
        v0 = ((v0 << 32) | (v0 >> 32)) & U64
        v2 = (v2 + v3) & U64
        v3 = ((v3 << 16) | (v3 >> 48)) & U64 ^ v2
        v0 = (v0 + v3) & U64
        v3 = ((v3 << 21) | (v3 >> 43)) & U64 ^ v0
        v2 = (v2 + v1) & U64
        v1 = ((v1 << 17) | (v1 >> 47)) & U64 ^ v2
        v2 = ((v2 << 32) | (v2 >> 32)) & U64
    return (v0 ^ v1 ^ v2 ^ v3) & U32


def fill_cyclic(slots: list[int], turns: list[int], size: int) -> np.ndarray:
    """An int32 table of ``size`` buckets filled by walking ``slots`` in
    order, cyclically, each taking ``max(turns, 1)`` buckets in a row (the
    reassign loops of ip_vs_sh.c, and of ip_vs_dh.c with every turn 1);
    -1 everywhere when there is no slot."""

    table = np.full(size, -1, dtype=np.int32)
    if not slots:
        return table
    i = 0
    n = len(slots)
    at = 0
    while i < size:
        run = min(max(turns[at], 1), size - i)
        table[i:i + run] = slots[at]
        i += run
        at = (at + 1) % n
    return table
