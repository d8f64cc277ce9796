"""Explicit randomness: every random stream is derived from (seed, purpose, ...ids)."""

from __future__ import annotations

import zlib

import numpy as np

__all__ = ["derive_seed", "rng_for"]


def _words(seed: int, purpose: str, ids: tuple[int, ...]) -> list[int]:
    # crc32 gives a stable (across processes and Python versions) id for the purpose string.
    return [seed & 0xFFFFFFFF, zlib.crc32(purpose.encode()), *(i & 0xFFFFFFFF for i in ids)]


def rng_for(seed: int, purpose: str, *ids: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(_words(seed, purpose, ids)))


def derive_seed(seed: int, purpose: str, *ids: int) -> int:
    """A 63-bit seed for torch generators, stable for the same inputs."""
    hi, lo = np.random.SeedSequence(_words(seed, purpose, ids)).generate_state(2, np.uint32)
    return ((int(hi) << 32) | int(lo)) & ((1 << 63) - 1)
