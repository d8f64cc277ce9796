"""Arithmetic in the ring Z_{2^k} on numpy unsigned integers.

Secure aggregation adds masked vectors modulo ``2^k`` (Bonawitz et al., CCS 2017, §3:
inputs live in ``Z_R``; we take ``R = 2^k`` so that numpy's native wrap-around does the
reduction). Elements are stored in ``uint32`` for ``k <= 32`` and ``uint64`` for
``k <= 64``. Because ``2^k`` divides ``2^32`` (or ``2^64``), sums may be computed with the
dtype's wrap-around and reduced with one bit-mask at the end; :meth:`Ring.reduce` does that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["MAX_RING_BITS", "MIN_RING_BITS", "Ring", "RingVector"]

MIN_RING_BITS = 8
MAX_RING_BITS = 64

RingVector = npt.NDArray[np.unsignedinteger[Any]]


@dataclass(frozen=True)
class Ring:
    """The ring ``Z_{2^bits}``; ``bits`` in ``[8, 64]``."""

    bits: int

    def __post_init__(self) -> None:
        if not MIN_RING_BITS <= self.bits <= MAX_RING_BITS:
            raise ValueError(
                f"ring bits={self.bits} outside [{MIN_RING_BITS}, {MAX_RING_BITS}]; "
                "use 32 (uint32 storage) or up to 64 (uint64 storage)"
            )

    @property
    def dtype(self) -> np.dtype[np.unsignedinteger[Any]]:
        return np.dtype(np.uint32) if self.bits <= 32 else np.dtype(np.uint64)

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    @property
    def mask(self) -> int:
        return (1 << self.bits) - 1

    @property
    def native(self) -> bool:
        """True when the dtype's own wrap-around already is reduction mod 2^bits."""
        return self.bits in (32, 64)

    @property
    def wire_bytes_per_element(self) -> float:
        """Bytes per element on the wire when bit-packed (used for traffic accounting)."""
        return self.bits / 8

    def zeros(self, length: int) -> RingVector:
        return np.zeros(length, dtype=self.dtype)

    def reduce(self, x: RingVector) -> RingVector:
        """Reduce ``x`` (same dtype) modulo ``2^bits`` in place and return it."""
        if not self.native:
            np.bitwise_and(x, x.dtype.type(self.mask), out=x)
        return x

    def add(self, a: RingVector, b: RingVector) -> RingVector:
        """``(a + b) mod 2^bits`` as a new array."""
        return self.reduce(np.add(a, b, dtype=self.dtype))

    def sub(self, a: RingVector, b: RingVector) -> RingVector:
        """``(a - b) mod 2^bits`` as a new array."""
        return self.reduce(np.subtract(a, b, dtype=self.dtype))

    def check(self, x: object, length: int, *, values: bool = True) -> RingVector:
        """Return ``x`` if it is a 1-D ring vector of ``length`` reduced elements, else raise.

        ``values=False`` checks dtype and shape only (for a caller that checks the range of
        the elements in a pass it makes anyway)."""
        if not isinstance(x, np.ndarray) or x.dtype != self.dtype or x.ndim != 1:
            got = f"{type(x).__name__} {getattr(x, 'dtype', '?')} ndim={getattr(x, 'ndim', '?')}"
            raise ValueError(f"expected a 1-D {self.dtype} ring vector, got {got}")
        if x.shape[0] != length:
            raise ValueError(f"ring vector has {x.shape[0]} elements, expected {length}")
        if values and not self.native and x.size and int(x.max()) > self.mask:
            raise ValueError(f"ring vector has elements >= 2^{self.bits}; reduce it first")
        return x
