"""SipHash, as the kernel's `hsiphash()` computes it on 64-bit machines (lib/siphash.c).

On 64-bit kernels hsiphash is SipHash-1-3 with a 128-bit key, truncated to 32 bits. The
mh scheduler keys it with fixed constants, so its table is reproducible here.
"""

from __future__ import annotations

M64 = 0xFFFFFFFFFFFFFFFF


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & M64


def siphash(data: bytes, k0: int, k1: int, c_rounds: int = 2, d_rounds: int = 4) -> int:
    """SipHash-c-d of `data` under the key (k0, k1) given as little-endian 64-bit words."""
    v0 = 0x736F6D6570736575 ^ k0
    v1 = 0x646F72616E646F6D ^ k1
    v2 = 0x6C7967656E657261 ^ k0
    v3 = 0x7465646279746573 ^ k1

    def rounds(n: int) -> None:
        nonlocal v0, v1, v2, v3
        for _ in range(n):
            v0 = (v0 + v1) & M64
            v1 = _rotl(v1, 13) ^ v0
            v0 = _rotl(v0, 32)
            v2 = (v2 + v3) & M64
            v3 = _rotl(v3, 16) ^ v2
            v0 = (v0 + v3) & M64
            v3 = _rotl(v3, 21) ^ v0
            v2 = (v2 + v1) & M64
            v1 = _rotl(v1, 17) ^ v2
            v2 = _rotl(v2, 32)

    n = len(data)
    end = n - n % 8
    for off in range(0, end, 8):
        m = int.from_bytes(data[off : off + 8], "little")
        v3 ^= m
        rounds(c_rounds)
        v0 ^= m
    b = ((n & 0xFF) << 56) | int.from_bytes(data[end:], "little")
    v3 ^= b
    rounds(c_rounds)
    v0 ^= b
    v2 ^= 0xFF
    rounds(d_rounds)
    return v0 ^ v1 ^ v2 ^ v3


def hsiphash_u32(value: int, k0: int, k1: int) -> int:
    """hsiphash(&value, 4, key) for a native (little-endian) u32, on a 64-bit kernel.

    Specialised form of `siphash(value.to_bytes(4, "little"), k0, k1, 1, 3) & 0xffffffff`:
    the mh scheduler calls it for every table slot and every new connection.
    """
    v0 = 0x736F6D6570736575 ^ k0
    v1 = 0x646F72616E646F6D ^ k1
    v2 = 0x6C7967656E657261 ^ k0
    v3 = 0x7465646279746573 ^ k1
    b = (4 << 56) | (value & 0xFFFFFFFF)
    v3 ^= b
    for r in range(4):  # one compression round, then three finalisation rounds
        if r == 1:
            v0 ^= b
            v2 ^= 0xFF
        v0 = (v0 + v1) & M64
        v1 = (((v1 << 13) | (v1 >> 51)) & M64) ^ v0
        v0 = ((v0 << 32) | (v0 >> 32)) & M64
        v2 = (v2 + v3) & M64
        v3 = (((v3 << 16) | (v3 >> 48)) & M64) ^ v2
        v0 = (v0 + v3) & M64
        v3 = (((v3 << 21) | (v3 >> 43)) & M64) ^ v0
        v2 = (v2 + v1) & M64
        v1 = (((v1 << 17) | (v1 >> 47)) & M64) ^ v2
        v2 = ((v2 << 32) | (v2 >> 32)) & M64
    return (v0 ^ v1 ^ v2 ^ v3) & 0xFFFFFFFF
