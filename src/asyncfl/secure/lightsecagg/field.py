"""The prime field ``F_p``, ``p = 2^32 - 5``, on numpy ``uint64`` vectors.

LightSecAgg (So et al., MLSys 2022, §4) needs a *field*, not the ring ``Z_{2^k}`` of SecAgg:
Lagrange coding divides by differences of evaluation points. We take the largest prime below
``2^32``. Every element is stored reduced in ``uint64``, so a product of two elements is at
most ``(p-1)^2 < 2^64`` and ``a * b + c < p^2 < 2^64`` for reduced ``a, b, c``: multiply-add
never overflows and one ``%`` reduces it. (A prime below ``2^31`` in ``int64`` would also fit,
with one bit less headroom for the aggregate; a prime near ``2^61`` would need 128-bit
products, which numpy lacks.) ``2^32 = 5 (mod p)`` keeps the limb recombination of
:func:`matmul` cheap.

Matrix products use float64 BLAS exactly: each operand is split into 16-bit limbs, so every
partial product is below ``2^32`` and a dot product of ``n <= 2^21`` of them stays below
``2^53``, where float64 is exact.

Random elements (masks, padding) are uniform by rejection sampling of AES-256-CTR keystream
words under a fresh key: a word ``>= p`` (probability ``5 / 2^32``) is redrawn, so there is no
modular bias at all.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = [
    "Entropy",
    "FieldVector",
    "P",
    "check_field",
    "inv",
    "matmul",
    "mulmod",
    "random_elements",
    "to_signed",
]

P = (1 << 32) - 5
"""The field modulus, the largest prime below 2^32."""

FieldVector = npt.NDArray[np.uint64]
"""Reduced field elements (each in [0, p)), any shape."""

Entropy = Callable[[int], bytes]

_P = np.uint64(P)
_LIMB = np.uint64(1 << 16)
_MAX_INNER = 1 << 21  # float64 exactness limit of one limb dot product (see module docstring)


def check_field(
    x: object, shape: tuple[int, ...] | None = None, what: str = "vector"
) -> FieldVector:
    """Return ``x`` if it is a ``uint64`` array of reduced elements (of ``shape``), else raise
    :class:`ValueError` naming what is wrong."""
    if not isinstance(x, np.ndarray) or x.dtype != np.uint64:
        got = f"{type(x).__name__} {getattr(x, 'dtype', '?')}"
        raise ValueError(f"{what} must be a uint64 array of field elements, got {got}")
    if shape is not None and x.shape != shape:
        raise ValueError(f"{what} has shape {x.shape}, expected {shape}")
    if x.size and int(x.max()) >= P:
        raise ValueError(f"{what} has elements >= p = {P}; reduce it mod p first")
    return x


def mulmod(a: FieldVector | np.uint64, b: FieldVector | np.uint64) -> FieldVector:
    """``a * b mod p`` elementwise (reduced inputs: the product stays below 2^64)."""
    return np.asarray(np.multiply(a, b) % _P, dtype=np.uint64)


def inv(a: FieldVector) -> FieldVector:
    """Elementwise inverse ``a^(p-2) mod p`` (Fermat) by vectorised square-and-multiply.

    Raises :class:`ZeroDivisionError` if an element is 0.
    """
    if np.any(a == 0):
        raise ZeroDivisionError("0 has no inverse in F_p")
    result = np.ones_like(a, dtype=np.uint64)
    base = a.astype(np.uint64, copy=True)
    e = P - 2
    while e:
        if e & 1:
            result = mulmod(result, base)
        base = mulmod(base, base)
        e >>= 1
    return result


def _limbs(x: FieldVector) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    return (x >> np.uint64(16)).astype(np.float64), (x & (_LIMB - np.uint64(1))).astype(np.float64)


def _exact(x: npt.NDArray[np.float64]) -> FieldVector:
    # Exact integers below 2^53 in float64: the cast is lossless.
    return x.astype(np.uint64) % _P


def matmul(a: FieldVector, b: FieldVector) -> FieldVector:
    """``a @ b mod p`` for 2-D reduced matrices, exact, through float64 BLAS on 16-bit limbs.

    With ``a = a1 2^16 + a0`` and ``b = b1 2^16 + b0`` (limbs < 2^16),
    ``ab = a1 b1 2^32 + (a1 b0 + a0 b1) 2^16 + a0 b0`` and ``2^32 = 5 (mod p)``.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul shapes {a.shape} @ {b.shape} do not align")
    if a.shape[1] > _MAX_INNER:
        raise ValueError(f"inner dimension {a.shape[1]} > 2^21 would lose float64 exactness")
    a1, a0 = _limbs(a)
    b1, b0 = _limbs(b)
    out = _exact(a0 @ b0)
    mid = (_exact(a1 @ b0) + _exact(a0 @ b1)) % _P  # < 2p < 2^64 before the reduction
    out += mid * _LIMB % _P
    out += _exact(a1 @ b1) * np.uint64(5) % _P
    out %= _P
    return out


def to_signed(x: FieldVector) -> npt.NDArray[np.int64]:
    """The centred lift: ``x`` read as an integer in ``(-p/2, p/2)``."""
    signed = x.astype(np.int64)
    signed[x > np.uint64(P // 2)] -= P
    return signed


def random_elements(n: int, entropy: Entropy = os.urandom) -> FieldVector:
    """``n`` independent uniform elements of ``F_p``.

    Words of AES-256-CTR keystream under a key drawn from ``entropy`` (the OS CSPRNG unless a
    test injects a reproducible source); words ``>= p`` are replaced by fresh words, which is
    exact rejection sampling.
    """
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    out = _keystream_words(n, entropy)
    bad = np.flatnonzero(out >= _P)
    while bad.size:
        out[bad] = _keystream_words(bad.size, entropy)
        bad = bad[out[bad] >= _P]
    return out


def _keystream_words(n: int, entropy: Entropy) -> FieldVector:
    key = entropy(32)
    enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    raw = enc.update(bytes(4 * n)) + enc.finalize()
    words: npt.NDArray[Any] = np.frombuffer(raw, dtype="<u4")
    return words.astype(np.uint64)
