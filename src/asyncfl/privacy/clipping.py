"""L2 clipping of one client's update: the step that bounds a user's sensitivity.

User-level DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models", Alg. 1) clips each user's whole update to L2 norm ``C`` before it is
summed, so adding or removing one user moves the sum by at most ``C``:

    clip(Δ, C) = Δ · min(1, C / ‖Δ‖₂)

The guarantee rests on ``‖clip(Δ, C)‖₂ <= C`` holding for the float32 vector that is
actually summed, so the norm is computed in float64 and the result is re-checked after the
cast back to float32 (a float32 rounding can overshoot ``C`` by an ulp).
"""

from __future__ import annotations

import math

import numpy as np

from asyncfl.core.update import FloatVector

__all__ = ["clip_update", "l2_norm"]

# One float32 ulp (relative) is 2**-23; shrinking by two of them per retry pulls the
# rounded vector back inside the ball in one or two iterations.
_SHRINK = 1.0 - 2.0**-22
_MAX_SHRINK_RETRIES = 8


def l2_norm(vector: FloatVector) -> float:
    """The L2 norm of ``vector``, accumulated in float64 (float32 sums lose ~1e-4 at 1e7 dims)."""
    return float(np.linalg.norm(vector.astype(np.float64, copy=False)))


def clip_update(delta: FloatVector, max_norm: float) -> tuple[FloatVector, float]:
    """Return ``(clipped copy of delta, original L2 norm)``.

    The copy has L2 norm ``<= max_norm`` (checked in float64 after the float32 cast) and
    never a larger norm than ``delta``. A zero-norm update is returned unchanged (as a
    copy) without any division. ``delta`` itself is never modified.

    Raises ``ValueError`` for a non-1-D / non-float32 / non-finite ``delta`` or a
    ``max_norm`` that is not a finite number > 0.
    """
    if not (isinstance(max_norm, int | float) and math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"max_norm={max_norm!r} must be a finite number > 0")
    if not isinstance(delta, np.ndarray) or delta.dtype != np.float32 or delta.ndim != 1:
        got = f"{type(delta).__name__} {getattr(delta, 'dtype', '?')}"
        raise ValueError(f"delta must be a 1-D float32 array, got {got}")
    norm = l2_norm(delta)
    if not math.isfinite(norm):
        raise ValueError("delta contains NaN or Inf; validate the update before clipping")
    if norm <= max_norm:
        # Covers norm == 0: nothing to scale, and no 0/0.
        return delta.copy(), norm
    wide = delta.astype(np.float64)
    scale = max_norm / norm
    for _ in range(_MAX_SHRINK_RETRIES):
        clipped = (wide * scale).astype(np.float32)
        if l2_norm(clipped) <= max_norm:
            return clipped, norm
        scale *= _SHRINK
    # Unreachable for finite inputs (each retry shrinks by 2 ulps); kept as a hard stop so
    # a sensitivity violation can never be returned silently.
    raise ArithmeticError(f"could not clip a vector of norm {norm} to {max_norm} in float32")
