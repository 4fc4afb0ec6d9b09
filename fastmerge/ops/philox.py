"""Counter-based random numbers: the oracle of the Philox4x32-10 stream every backend draws DARE/DELLA drops from,
and the 64-bit keys that name a tensor's stream."""

from __future__ import annotations

import torch

_U32 = 0xFFFFFFFF
_I64 = 1 << 64
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def to_i64(v: int) -> int:
    """A uint64 (or any Python int) as the signed int64 that torch.library schemas carry."""
    v %= _I64
    return v - _I64 if v >= 1 << 63 else v


def name_key(name: str) -> int:
    """64-bit FNV-1a hash of a tensor name: the ``key`` of its random stream (as a signed int64)."""
    h = 0xCBF29CE484222325
    for b in name.encode():
        h = ((h ^ b) * 0x100000001B3) % _I64
    return to_i64(h)


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product a*b, a < 2^32 constant, b uint32 held in int64.

    b is split in 16-bit halves so no intermediate exceeds 2^49 (int64 never overflows).
    """
    x = a * (b >> 16)
    z = ((x & 0xFFFF) << 16) + a * (b & 0xFFFF)
    return (x >> 16) + (z >> 32), z & _U32


def philox_uniform(n: int, seed: int, key: int, offset: int = 0, device=None) -> torch.Tensor:
    """Uniform fp32 numbers in [0, 1) for element indices offset .. offset+n-1. Returns fp32 (n,).

    Philox4x32-10 (Salmon et al., SC'11): key = (seed lo, seed hi), counter = (g lo, g hi, key lo, key hi)
    with g = index >> 2; the output word is (index & 3) and u = (word >> 8) * 2^-24, exact in fp32.
    ``seed`` and ``key`` are taken modulo 2^64 (negative Python ints are fine).
    """
    seed &= (1 << 64) - 1
    key &= (1 << 64) - 1
    idx = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
    g = idx >> 2
    c0, c1 = g & _U32, (g >> 32) & _U32
    c2 = torch.full_like(g, key & _U32)
    c3 = torch.full_like(g, key >> 32)
    k0, k1 = seed & _U32, seed >> 32
    for r in range(10):
        if r:
            k0, k1 = (k0 + PHILOX_W0) & _U32, (k1 + PHILOX_W1) & _U32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    words = torch.stack([c0, c1, c2, c3], dim=1)
    w = words.gather(1, (idx & 3).unsqueeze(1)).squeeze(1)
    return (w >> 8).to(torch.float32) * (2.0**-24)
