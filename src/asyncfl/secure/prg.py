"""Mask expansion: AES-256 in counter mode as a pseudo-random generator into ``Z_{2^k}``.

Bonawitz et al. (CCS 2017, §4, "PRG") expand a short seed into a mask vector with a PRG;
AES-CTR with the seed as key is the standard instantiation. The keystream is generated into a
reusable byte buffer (``update_into``) and viewed as ``uint32``/``uint64``; no Python loop
touches vector elements. A uniform ``uint32`` word reduced mod ``2^k`` (``k <= 32``) is
uniform in ``Z_{2^k}``, so reduction happens once, after the masks are summed.

Accumulating a mask (``acc += scale * mask``) runs in chunks of ``_CHUNK`` elements: each
chunk of keystream is scaled and added while it is still in the cache, so the mask never
exists at full size, and the secure buffer's enclave can interleave other requests between
chunks (:meth:`MaskExpander.accumulate_steps`). CTR mode makes the chunked keystream
identical to the one-shot one.

AES-256, not AES-128: the seed is 32 bytes, and AES-128 (measured 1.14x faster here) would
use only half of it, lowering the security level of every mask to 128 bits (and less
against multi-target key search over many masked uploads whose high bits are known).

Each seed is used for exactly one vector: pairwise seeds are derived per session and pair
and self-mask seeds are fresh, so a fixed all-zero nonce never repeats a (key, counter) pair.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from asyncfl.secure.ring import Ring, RingVector

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers import CipherContext as _CtrEncryptor

__all__ = ["SEED_BYTES", "MaskExpander"]

SEED_BYTES = 32
_NONCE = bytes(16)
_AES_BLOCK = 16
# Elements per accumulation chunk: 1 MiB (uint32) or 2 MiB (uint64) of keystream stay in the
# cache between being generated, scaled and added, and each chunk is ~0.15-0.3 ms of work (an
# enclave answers a request within that). Measured on a 2-core EPYC VM: 2^18 as fast as one
# whole-vector pass, and 2^16 ~10% slower (per-call overhead).
_CHUNK = 1 << 18


class MaskExpander:
    """Expands seeds into masks of one ring and length, reusing its buffers.

    Not thread-safe (it owns scratch buffers); create one per thread.
    """

    def __init__(self, ring: Ring, length: int) -> None:
        if length < 0:
            raise ValueError(f"mask length={length} must be >= 0")
        self.ring = ring
        self.length = length
        self._chunk = max(1, min(length, _CHUNK))
        nbytes = self._chunk * ring.dtype.itemsize
        self._zeros = memoryview(bytes(nbytes))
        # update_into needs len(out) >= len(in) + block_size - 1.
        self._buf = np.empty(nbytes + _AES_BLOCK - 1, dtype=np.uint8)
        self._out = memoryview(self._buf)  # type: ignore[arg-type]
        self._view: RingVector = self._buf[:nbytes].view(ring.dtype)

    def _encryptor(self, seed: bytes) -> _CtrEncryptor:
        if len(seed) != SEED_BYTES:
            raise ValueError(f"PRG seed has {len(seed)} bytes, expected {SEED_BYTES}")
        return Cipher(algorithms.AES(seed), modes.CTR(_NONCE)).encryptor()

    def _next_keystream(self, enc: _CtrEncryptor, n: int) -> RingVector:
        """The next ``n <= chunk`` keystream words of ``enc``, in this expander's scratch."""
        enc.update_into(self._zeros[: n * self.ring.dtype.itemsize], self._out)
        return self._view[:n]

    def expand(self, seed: bytes) -> RingVector:
        """The mask of ``seed`` as a new reduced ring vector."""
        out = self.ring.zeros(self.length)
        self.accumulate(out, seed)
        return self.ring.reduce(out)

    def accumulate(
        self, acc: RingVector, seed: bytes, negate: bool = False, scale: int = 1
    ) -> None:
        """``acc += scale * mask(seed)`` (or ``-=``) with the dtype's wrap-around, unreduced.

        The keystream is scaled in place in this expander's chunk-sized scratch buffer, so no
        model-sized temporary is allocated (the secure buffer's enclave calls this once per
        arrival). Call :meth:`Ring.reduce` on ``acc`` once after the last accumulation.
        """
        for _ in self.accumulate_steps(acc, seed, negate=negate, scale=scale):
            pass

    def accumulate_steps(
        self,
        acc: RingVector,
        seed: bytes,
        *,
        negate: bool = False,
        scale: int = 1,
        assign: bool = False,
    ) -> Iterator[None]:
        """:meth:`accumulate` one chunk per ``next()``: arguments are checked now, each
        ``next()`` adds the next chunk of the mask, and the one that adds the last chunk raises
        ``StopIteration``. Steps must not be interleaved with any other use of this expander
        (they share its scratch buffer). ``assign``: overwrite ``acc`` with ``scale * mask``
        instead of adding (a fresh accumulator needs no zeroing pass)."""
        if acc.dtype != self.ring.dtype or acc.shape != (self.length,):
            raise ValueError(
                f"accumulator must be {self.ring.dtype}[{self.length}], "
                f"got {acc.dtype}{list(acc.shape)}"
            )
        if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
            raise ValueError(f"scale={scale!r} must be an integer >= 1")
        if assign and negate:
            raise ValueError("assign=True takes negate=False")
        enc = self._encryptor(seed)
        # Products wrap modulo 2^32 or 2^64, of which 2^k is a divisor: still exact mod 2^k.
        factor = None if scale == 1 else acc.dtype.type(scale % (1 << (8 * acc.dtype.itemsize)))
        return self._steps(acc, enc, negate, factor, assign)

    def _steps(
        self,
        acc: RingVector,
        enc: _CtrEncryptor,
        negate: bool,
        factor: np.unsignedinteger[Any] | None,
        assign: bool,
    ) -> Iterator[None]:
        op = np.subtract if negate else np.add
        for start in range(0, self.length, self._chunk):
            if start:
                yield  # between chunks only: the call that adds the last chunk ends the steps
            stop = min(start + self._chunk, self.length)
            ks = self._next_keystream(enc, stop - start)
            part = acc[start:stop]
            if assign:
                if factor is None:
                    np.copyto(part, ks)
                else:
                    np.multiply(ks, factor, out=part)
                continue
            if factor is not None:
                np.multiply(ks, factor, out=ks)
            op(part, ks, out=part)
