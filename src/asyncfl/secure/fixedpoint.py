"""Fixed-point codec: float32 updates <-> elements of the ring ``Z_{2^k}``.

Secure aggregation sums integers modulo ``2^k`` (Bonawitz et al., CCS 2017, §3), so each
client encodes its update as ``q_i = w_i * round(clip(x_i, -c, c) * 2^f)`` where ``w_i`` is its
integer example weight. Weights are applied *before* masking, so the server learns only
``sum_i q_i`` and ``W = sum_i w_i`` and decodes the weighted mean ``sum_i q_i / (2^f W)``.

No wrap-around: with ``Q = ceil(c * 2^f)`` every ``|round(clip(x) * 2^f)| <= Q``, hence
``|sum_i q_i| <= W Q``. Decoding reads the ring sum as a signed two's-complement number, which
is exact while ``W Q <= 2^(k-1) - 1``; :meth:`FixedPointCodec.max_total_weight` is that limit.

Error bound of the decoded mean against the float64 weighted mean of the clipped inputs:
each rounding error ``e_i`` has ``|e_i| < 1`` (stochastic, unbiased) or ``<= 1/2`` (nearest)
units of ``2^-f``, and the weighted mean of errors is bounded by the largest one, so
``|mean - ref| <= 2^-f`` (stochastic) or ``2^-(f+1)`` (nearest), plus float64 division
(``<= c 2^-52``) and the final float32 cast (``<= c 2^-24``, half an ulp at magnitude ``c``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np
import numpy.typing as npt

from asyncfl.core.update import FloatVector
from asyncfl.errors import ConfigError, ConfigProblem
from asyncfl.secure.ring import MAX_RING_BITS, Ring, RingVector

__all__ = ["FixedPointCodec", "Rounding"]

_CHUNK = 1 << 16  # elements per decoding chunk: its int64 scratch stays in the L2 cache


class Rounding(Enum):
    """How a scaled value is rounded to an integer."""

    STOCHASTIC = "stochastic"  # unbiased: E[round(y)] = y; needs an rng
    NEAREST = "nearest"  # deterministic, half the worst-case error


@dataclass(frozen=True)
class FixedPointCodec:
    """Encode float vectors into ``Z_{2^ring_bits}`` with ``frac_bits`` fractional bits.

    ``clip`` is the per-coordinate bound ``c``; inputs are clipped to ``[-c, c]``.
    """

    clip: float
    frac_bits: int
    ring_bits: int
    rounding: Rounding = Rounding.STOCHASTIC

    def __post_init__(self) -> None:
        problems = []
        if not (math.isfinite(self.clip) and self.clip > 0):
            problems.append(ConfigProblem("clip", self.clip, "a finite float > 0"))
        if not 0 <= self.frac_bits <= 52:
            problems.append(ConfigProblem("frac_bits", self.frac_bits, "an int in [0, 52]"))
        if not 8 <= self.ring_bits <= MAX_RING_BITS:
            problems.append(ConfigProblem("ring_bits", self.ring_bits, "an int in [8, 64]"))
        if not problems and self.max_total_weight() < 1:
            problems.append(
                ConfigProblem(
                    "ring_bits",
                    self.ring_bits,
                    f"> {math.log2(self.quantum_bound()) + 1:.1f}: one input of magnitude "
                    f"clip * 2^frac_bits = {self.quantum_bound()} already wraps; "
                    "raise ring_bits or lower clip/frac_bits",
                )
            )
        if problems:
            raise ConfigError(problems)

    @property
    def ring(self) -> Ring:
        return Ring(self.ring_bits)

    def quantum_bound(self) -> int:
        """``Q = ceil(c 2^f)``: the largest magnitude of one encoded coordinate at weight 1."""
        return math.ceil(self.clip * 2.0**self.frac_bits)

    def max_total_weight(self) -> int:
        """Largest total weight ``W`` whose weighted sum cannot wrap: ``W Q <= 2^(k-1) - 1``."""
        return ((1 << (self.ring_bits - 1)) - 1) // self.quantum_bound()

    def max_summands(self, max_weight: int = 1) -> int:
        """How many inputs of weight ``<= max_weight`` can be summed without wrap-around."""
        if max_weight < 1:
            raise ValueError(f"max_weight={max_weight} must be >= 1")
        return self.max_total_weight() // max_weight

    def check_total_weight(self, total_weight: int) -> None:
        """Raise :class:`ConfigError` if a sum with this total weight could wrap."""
        limit = self.max_total_weight()
        if not 1 <= total_weight <= limit:
            raise ConfigError(
                [
                    ConfigProblem(
                        "total_weight",
                        total_weight,
                        f"an int in [1, {limit}] for clip={self.clip}, frac_bits="
                        f"{self.frac_bits}, ring_bits={self.ring_bits} (|sum| <= W * "
                        f"{self.quantum_bound()} must stay below 2^{self.ring_bits - 1}); "
                        "raise ring_bits or lower frac_bits/clip",
                    )
                ]
            )

    def error_bound(self, total_weight: int) -> float:
        """Bound on ``|decode_sum(...) - weighted mean of clipped inputs|`` per coordinate."""
        self.check_total_weight(total_weight)
        unit = 2.0**-self.frac_bits
        rounding = unit if self.rounding is Rounding.STOCHASTIC else unit / 2
        return rounding + self.clip * (2.0**-24 + 2.0**-52)

    def encode(
        self, vec: FloatVector, weight: int = 1, rng: np.random.Generator | None = None
    ) -> RingVector:
        """``weight * round(clip(vec) * 2^f) mod 2^k``; stochastic rounding needs ``rng``."""
        if not isinstance(vec, np.ndarray) or vec.ndim != 1:
            raise ValueError("encode expects a 1-D float array")
        if not np.isfinite(vec).all():
            raise ValueError("cannot encode NaN or Inf")
        if not 1 <= weight <= self.max_total_weight():
            raise ValueError(
                f"weight={weight} outside [1, {self.max_total_weight()}] (the no-wrap limit)"
            )
        if self.rounding is Rounding.STOCHASTIC and rng is None:
            raise ValueError("stochastic rounding needs rng=np.random.Generator")
        scaled = np.clip(vec.astype(np.float64), -self.clip, self.clip) * 2.0**self.frac_bits
        q: npt.NDArray[np.int64]
        if self.rounding is Rounding.STOCHASTIC:
            assert rng is not None
            q = np.floor(scaled + rng.random(scaled.shape[0])).astype(np.int64)
        else:
            q = np.rint(scaled).astype(np.int64)
        # |q * weight| <= W Q < 2^63: no int64 overflow. astype wraps two's complement.
        q *= weight
        return self.ring.reduce(q.astype(self.ring.dtype))

    def decode_sum(self, ring_sum: RingVector, total_weight: int) -> FloatVector:
        """The weighted mean ``sum_i q_i / (2^f W)`` as float32, from the ring sum."""
        self.check_total_weight(total_weight)
        ring = self.ring
        ring.check(ring_sum, ring_sum.shape[0] if ring_sum.ndim == 1 else -1)
        # Divided in float64 and rounded once to float32 in numpy's buffered loop (no
        # model-sized float64 temporary): the same result as dividing a float64 copy.
        denom = 2.0**self.frac_bits * total_weight
        mean = np.empty(ring_sum.shape, dtype=np.float32)
        if ring.native:
            # Two's complement of the storage width is the signed reading: a free view.
            signed = ring_sum.view(np.int32 if ring.bits == 32 else np.int64)
            np.divide(signed, denom, out=mean, dtype=np.float64, casting="same_kind")
            return mean
        # Sign-extend bit k-1 as (x XOR 2^(k-1)) - 2^(k-1), in cache-sized chunks.
        half = 1 << (ring.bits - 1)
        scratch = np.empty(min(ring_sum.shape[0], _CHUNK), dtype=np.int64)
        for start in range(0, ring_sum.shape[0], _CHUNK):
            stop = min(start + _CHUNK, ring_sum.shape[0])
            part = scratch[: stop - start]
            np.bitwise_xor(ring_sum[start:stop], half, out=part, casting="unsafe")
            np.subtract(part, half, out=part)
            np.divide(part, denom, out=mean[start:stop], dtype=np.float64, casting="same_kind")
        return mean
