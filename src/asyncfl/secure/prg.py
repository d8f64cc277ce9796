"""Mask expansion: AES-256 in counter mode as a pseudo-random generator into ``Z_{2^k}``.

Bonawitz et al. (CCS 2017, §4, "PRG") expand a short seed into a mask vector with a PRG;
AES-CTR with the seed as key is the standard instantiation. The keystream is generated into a
reusable byte buffer (``update_into``) and viewed as ``uint32``/``uint64``; no Python loop
touches vector elements. A uniform ``uint32`` word reduced mod ``2^k`` (``k <= 32``) is
uniform in ``Z_{2^k}``, so reduction happens once, after the masks are summed.

Each seed is used for exactly one vector: pairwise seeds are derived per session and pair
and self-mask seeds are fresh, so a fixed all-zero nonce never repeats a (key, counter) pair.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from asyncfl.secure.ring import Ring, RingVector

__all__ = ["SEED_BYTES", "MaskExpander"]

SEED_BYTES = 32
_NONCE = bytes(16)
_AES_BLOCK = 16


class MaskExpander:
    """Expands seeds into masks of one ring and length, reusing its buffers.

    Not thread-safe (it owns scratch buffers); create one per thread.
    """

    def __init__(self, ring: Ring, length: int) -> None:
        if length < 0:
            raise ValueError(f"mask length={length} must be >= 0")
        self.ring = ring
        self.length = length
        self._nbytes = length * ring.dtype.itemsize
        self._zeros = memoryview(bytes(self._nbytes))
        # update_into needs len(out) >= len(in) + block_size - 1.
        self._buf = np.empty(self._nbytes + _AES_BLOCK - 1, dtype=np.uint8)
        self._out = memoryview(self._buf)  # type: ignore[arg-type]
        self._view: RingVector = self._buf[: self._nbytes].view(ring.dtype)

    def _keystream(self, seed: bytes) -> RingVector:
        if len(seed) != SEED_BYTES:
            raise ValueError(f"PRG seed has {len(seed)} bytes, expected {SEED_BYTES}")
        enc = Cipher(algorithms.AES(seed), modes.CTR(_NONCE)).encryptor()
        enc.update_into(self._zeros, self._out)
        return self._view

    def expand(self, seed: bytes) -> RingVector:
        """The mask of ``seed`` as a new reduced ring vector."""
        return self.ring.reduce(self._keystream(seed).copy())

    def accumulate(
        self, acc: RingVector, seed: bytes, negate: bool = False, scale: int = 1
    ) -> None:
        """``acc += scale * mask(seed)`` (or ``-=``) with the dtype's wrap-around, unreduced.

        The keystream is scaled in place in this expander's scratch buffer, so no model-sized
        temporary is allocated (the secure buffer's enclave calls this once per arrival).
        Call :meth:`Ring.reduce` on ``acc`` once after the last accumulation.
        """
        if acc.dtype != self.ring.dtype or acc.shape != (self.length,):
            raise ValueError(
                f"accumulator must be {self.ring.dtype}[{self.length}], "
                f"got {acc.dtype}{list(acc.shape)}"
            )
        if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
            raise ValueError(f"scale={scale!r} must be an integer >= 1")
        ks = self._keystream(seed)
        if scale != 1:
            # Products wrap modulo 2^32 or 2^64, of which 2^k is a divisor: still exact mod 2^k.
            np.multiply(ks, ks.dtype.type(scale % (1 << (8 * ks.dtype.itemsize))), out=ks)
        if negate:
            np.subtract(acc, ks, out=acc)
        else:
            np.add(acc, ks, out=acc)
