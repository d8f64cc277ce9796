"""Staleness and example weights, and the weighted sum that FedBuff and FedAsync aggregate into.

Staleness ``s`` = server version at arrival − ``update.base_version`` (an int >= 0):

* ``constant``: ``1``.
* ``polynomial``: ``(1 + s)^(−a)``; Nguyen et al., "Federated Learning with Buffered
  Asynchronous Aggregation" (FedBuff, AISTATS 2022) use ``a = 0.5``, i.e. ``1/√(1+s)``.
* ``hinge``: ``1`` if ``s <= b`` else ``1 / (a·(s − b) + 1)``; Xie, Koyejo, Gupta,
  "Asynchronous Federated Optimization" (FedAsync, 2019), §5, with ``a = 10, b = 4``.

The field defaults of :class:`StalenessConfig` (``a = 0.5``) are the *polynomial* ones: a bare
``StalenessConfig(kind="hinge")`` has slope 0.5, not FedAsync's 10. Use
:meth:`StalenessConfig.paper_default` to get each kind with its paper's parameters.

Example weights of an update trained on ``n`` examples: ``equal`` → 1 (even for ``n = 0``),
``linear`` → ``n`` (FedAvg), ``sqrt`` → ``√n``, ``log`` → ``log(1 + n)`` (``log1p``: 0 for
``n = 0``, ``log 2`` for ``n = 1``, so a single-example update still counts).
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from asyncfl.core.update import FloatVector
from asyncfl.errors import ConfigProblem

__all__ = [
    "ExampleWeighting",
    "StalenessConfig",
    "StalenessKind",
    "WeightedSum",
    "example_weight",
]

StalenessKind = Literal["constant", "polynomial", "hinge"]
ExampleWeighting = Literal["equal", "linear", "sqrt", "log"]
_STALENESS_KINDS: tuple[str, ...] = get_args(StalenessKind)
_EXAMPLE_WEIGHTINGS: tuple[str, ...] = get_args(ExampleWeighting)


def _non_negative_int(name: str, value: int) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool {value!r}")
    n = operator.index(value)  # accepts numpy integers, refuses floats
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {n}")
    return n


@dataclass(frozen=True)
class StalenessConfig:
    """How much a stale update counts. ``a`` is the exponent (polynomial) or slope (hinge);
    ``b`` the hinge's grace period in versions. ``constant`` ignores both."""

    kind: StalenessKind = "polynomial"
    """constant: 1; polynomial: (1+s)^-a (FedBuff); hinge: 1 if s <= b else 1/(a(s-b)+1)
    (FedAsync)."""
    a: float = 0.5
    """Exponent (polynomial) or slope (hinge; the FedAsync paper uses 10)."""
    b: int = 4
    """Hinge: staleness (in versions) that is not penalised."""

    @classmethod
    def paper_default(cls, kind: StalenessKind) -> StalenessConfig:
        """``kind`` with its paper's parameters: polynomial a=0.5 (FedBuff), hinge a=10, b=4
        (FedAsync)."""
        if kind == "hinge":
            return cls(kind="hinge", a=10.0, b=4)
        return cls(kind=kind)

    def validate(self, path: str = "") -> list[ConfigProblem]:
        """Every problem with this config (empty if usable); ``path`` prefixes field names."""
        problems: list[ConfigProblem] = []
        if self.kind not in _STALENESS_KINDS:
            problems.append(
                ConfigProblem(
                    f"{path + '.' if path else ''}kind",
                    self.kind,
                    f"one of {list(_STALENESS_KINDS)}",
                )
            )
        a_ok = isinstance(self.a, int | float) and not isinstance(self.a, bool)
        # a < 0 would up-weight stale updates (and a negative hinge slope divides by zero).
        if not a_ok or not (math.isfinite(self.a) and self.a >= 0):
            problems.append(
                ConfigProblem(f"{path + '.' if path else ''}a", self.a, "a finite number >= 0")
            )
        if isinstance(self.b, bool) or not isinstance(self.b, int) or self.b < 0:
            problems.append(
                ConfigProblem(f"{path + '.' if path else ''}b", self.b, "an int >= 0 (versions)")
            )
        return problems

    def weight(self, s: int) -> float:
        """The weight in ``(0, 1]`` (0 only by float underflow) of an update ``s`` versions stale.

        Assumes :meth:`validate` found no problem. Raises ``ValueError`` if ``s < 0``.
        """
        s = _non_negative_int("staleness s", s)
        if self.kind == "constant":
            return 1.0
        if self.kind == "polynomial":
            return float((1.0 + s) ** (-self.a))
        if self.kind == "hinge":
            return 1.0 if s <= self.b else 1.0 / (self.a * (s - self.b) + 1.0)
        raise ValueError(
            f"unknown staleness kind {self.kind!r}; expected one of {_STALENESS_KINDS}"
        )


def example_weight(kind: ExampleWeighting, n: int) -> float:
    """Weight of an update trained on ``n >= 0`` examples (see the module docstring)."""
    n = _non_negative_int("num_examples n", n)
    if kind == "equal":
        return 1.0
    if kind == "linear":
        return float(n)
    if kind == "sqrt":
        return math.sqrt(n)
    if kind == "log":
        return math.log1p(n)
    raise ValueError(f"unknown example weighting {kind!r}; expected one of {_EXAMPLE_WEIGHTINGS}")


# Elements per chunk of the scaled delta: a fixed 256 KiB scratch (cache-resident) instead of a
# model-sized temporary for ``weight * delta``.
_CHUNK = 1 << 16
_F32_MAX = float(np.finfo(np.float32).max)


class WeightedSum:
    """Accumulates ``Σ wₖ·δₖ`` in one float32 vector of the model size, in arrival order.

    Each :meth:`add` rounds ``w`` to float32, the product and the running sum once each, so
    after ``n`` updates every coordinate is within ``γ(n+1)·Σₖ|wₖ·δₖ|`` of the exact sum, with
    ``γ(k) = k·u / (1 − k·u)`` and ``u = 2⁻²⁴`` (Higham, *Accuracy and Stability of Numerical
    Algorithms*, §4.2), plus ``2⁻¹⁴⁹`` per rounding in float32's subnormal range. The order is
    fixed by arrival, so a replay is bit-for-bit identical. The scalar totals stay Python floats.
    Each update is refused if ``w·δ`` itself would overflow; the running sum can still reach inf
    only if a coordinate's total passes float32's maximum (≈3.4e38).
    """

    def __init__(self, dim: int) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive int (the model size), got {dim!r}")
        self._sum: FloatVector = np.zeros(dim, dtype=np.float32)
        self._scratch: FloatVector = np.empty(min(dim, _CHUNK), dtype=np.float32)
        self._count = 0
        self._total_weight = 0.0

    @property
    def dim(self) -> int:
        return int(self._sum.shape[0])

    @property
    def count(self) -> int:
        """Number of :meth:`add` calls since the last :meth:`reset`, zero weights included."""
        return self._count

    @property
    def total_weight(self) -> float:
        """Sum of the weights passed to :meth:`add` (Python float, summed in arrival order)."""
        return self._total_weight

    @property
    def sum(self) -> FloatVector:
        """A read-only view of the live buffer: copy it to keep it past the next add/reset."""
        view = self._sum.view()
        view.flags.writeable = False
        return view

    def add(self, delta: FloatVector, weight: float) -> None:
        """Add ``weight · delta``. Raises ``ValueError`` (nothing changed) if ``delta`` is not a
        finite float32 vector of ``dim`` values, ``weight`` is not finite and ``>= 0``, or the
        scaled delta would overflow float32."""
        dim = self.dim
        if not isinstance(delta, np.ndarray) or delta.dtype != np.float32 or delta.shape != (dim,):
            got = f"{type(delta).__name__} {getattr(delta, 'dtype', '?')} "
            got += f"{getattr(delta, 'shape', '?')}"
            raise ValueError(f"delta must be a float32 array of shape ({dim},), got {got}")
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise ValueError(f"weight must be a real number, got {weight!r}")
        w = float(weight)
        if not (math.isfinite(w) and 0 <= w <= _F32_MAX):
            raise ValueError(f"weight must be finite, >= 0 and within float32 range, got {w!r}")
        w32 = np.float32(w)
        # max/min propagate NaN, so they check finiteness and give the overflow bound in one go.
        hi, lo = float(delta.max()), float(delta.min())
        if not (math.isfinite(hi) and math.isfinite(lo)):
            raise ValueError("delta contains NaN or Inf")
        # A product <= FLT_MAX cannot round to inf, so this refuses every overflow.
        if float(w32) * max(hi, -lo) > _F32_MAX:
            raise ValueError(f"weight {w!r} times max |delta| {max(hi, -lo):.3g} overflows float32")

        if w == 0.0:
            pass  # counted, contributes nothing (w·δ is ±0 for finite δ)
        elif w32 == 1.0:
            self._sum += delta  # same rounding as multiplying by 1 first
        else:
            scratch = self._scratch
            for start in range(0, dim, _CHUNK):
                stop = min(start + _CHUNK, dim)
                part = scratch[: stop - start]
                np.multiply(delta[start:stop], w32, out=part)
                self._sum[start:stop] += part
        self._count += 1
        self._total_weight += w

    def mean(self, denominator: float) -> FloatVector:
        """A new vector ``sum / denominator``. Usually ``denominator`` is :attr:`total_weight`
        (a weighted mean) or :attr:`count`; ``<= 0`` raises ``ValueError``, never zeros."""
        d = float(denominator)
        if not (math.isfinite(d) and d > 0):
            raise ValueError(
                f"denominator must be finite and > 0, got {denominator!r} (no update, or only "
                "zero-weight updates, were added: there is nothing to average)"
            )
        d32 = np.float32(d) if d <= _F32_MAX else np.float32(0.0)
        if not d32 > 0:
            raise ValueError(f"denominator {denominator!r} is outside float32's positive range")
        with np.errstate(over="ignore"):  # checked just below, with a better message
            mean = np.divide(self._sum, d32)
        # Only a denominator below 1 can push a finite sum past FLT_MAX.
        if d32 < 1 and not (math.isfinite(float(mean.max())) and math.isfinite(float(mean.min()))):
            raise ValueError(f"sum / {denominator!r} overflows float32")
        return mean

    def reset(self) -> None:
        """Zero the sum and the totals, keeping the buffer (no reallocation)."""
        self._sum.fill(0.0)
        self._count = 0
        self._total_weight = 0.0
