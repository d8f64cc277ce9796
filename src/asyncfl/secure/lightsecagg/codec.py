"""Fixed-point codec into ``F_p``: float updates <-> field elements, with headroom checks.

The same quantiser as :class:`~asyncfl.secure.fixedpoint.FixedPointCodec` (clip to
``[-c, c]``, scale by ``2^f``, round stochastically or to nearest; reused, not rewritten), but
the integer ``q`` is stored as ``q mod p`` and a weighted sum is read back with the centred
lift (:func:`~asyncfl.secure.lightsecagg.field.to_signed`). The lift is exact while
``|sum_c W_c q_c| <= W Q <= (p - 1) / 2`` with ``Q = ceil(c 2^f)`` and ``W = sum_c W_c``:
:meth:`FieldCodec.max_total_weight` is that limit. With ``p ~ 2^32`` there are 31 bits for
``log2(W) + log2(Q)``, e.g. ``K = 10`` updates at weight ``2^6`` and ``f = 16`` use 26.

The error bound is the ring codec's (rounding ``2^-f`` stochastic or ``2^-(f+1)`` nearest,
plus float64 division and the float32 cast): the field changes where integers live, not
how they are rounded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from asyncfl.core.update import FloatVector
from asyncfl.errors import ConfigError, ConfigProblem
from asyncfl.secure.fixedpoint import FixedPointCodec, Rounding
from asyncfl.secure.lightsecagg.field import FieldVector, P, check_field, to_signed

__all__ = ["FieldCodec"]


@dataclass(frozen=True)
class FieldCodec:
    """Encode float vectors into ``F_p`` with ``frac_bits`` fractional bits."""

    clip: float
    frac_bits: int
    rounding: Rounding = Rounding.STOCHASTIC

    def __post_init__(self) -> None:
        # Validates clip and frac_bits (64-bit ring: the integer q before the mod p).
        fixed = FixedPointCodec(self.clip, self.frac_bits, 64, self.rounding)
        if fixed.quantum_bound() > (P - 1) // 2:
            raise ConfigError(
                [
                    ConfigProblem(
                        "frac_bits",
                        self.frac_bits,
                        f"clip * 2^frac_bits <= {(P - 1) // 2} (half the field p = {P}); "
                        "lower frac_bits or clip",
                    )
                ]
            )

    @property
    def fixed(self) -> FixedPointCodec:
        return FixedPointCodec(self.clip, self.frac_bits, 64, self.rounding)

    def quantum_bound(self) -> int:
        """``Q = ceil(c 2^f)``."""
        return self.fixed.quantum_bound()

    def max_total_weight(self) -> int:
        """Largest ``W`` with ``W Q <= (p - 1) / 2``: the centred lift of the sum is exact."""
        return ((P - 1) // 2) // self.quantum_bound()

    def check_total_weight(self, total_weight: int) -> None:
        limit = self.max_total_weight()
        if not 1 <= total_weight <= limit:
            raise ConfigError(
                [
                    ConfigProblem(
                        "total_weight",
                        total_weight,
                        f"an int in [1, {limit}] for clip={self.clip}, frac_bits={self.frac_bits} "
                        f"in F_p, p = 2^32 - 5 (|sum| <= W * {self.quantum_bound()} must stay "
                        "below p/2); lower frac_bits, weight_bits or the buffer size",
                    )
                ]
            )

    def error_bound(self, total_weight: int) -> float:
        """Per-coordinate bound on ``|decode_sum - weighted mean of clipped inputs|``."""
        self.check_total_weight(total_weight)
        unit = 2.0**-self.frac_bits
        rounding = unit if self.rounding is Rounding.STOCHASTIC else unit / 2
        return rounding + self.clip * (2.0**-24 + 2.0**-52)

    def encode(self, vec: FloatVector, rng: np.random.Generator | None = None) -> FieldVector:
        """``round(clip(vec) 2^f) mod p`` (weight 1: weights are applied in the field)."""
        q = self.fixed.encode(vec, 1, rng).view(np.int64)  # two's complement of the signed q
        return np.asarray(q % P, dtype=np.uint64)  # numpy % by a positive int is >= 0

    def decode_sum(self, signed_sum: np.ndarray, total_weight: int) -> FloatVector:
        """``sum_c W_c q_c / (2^f W)`` as float32 from the lifted (signed int64) sum."""
        self.check_total_weight(total_weight)
        if signed_sum.dtype != np.int64 or signed_sum.ndim != 1:
            raise ValueError(f"expected a 1-D int64 sum, got {signed_sum.dtype} {signed_sum.shape}")
        return (signed_sum / (2.0**self.frac_bits * total_weight)).astype(np.float32)

    def decode_field_sum(self, field_sum: FieldVector, total_weight: int) -> FloatVector:
        """:meth:`decode_sum` of a reduced field vector."""
        check_field(field_sum, None, "field sum")
        return self.decode_sum(to_signed(field_sum), total_weight)
