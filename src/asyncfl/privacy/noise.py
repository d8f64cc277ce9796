"""Gaussian noise for user-level DP, added once per server step to the SUM of clipped updates.

The Gaussian mechanism of DP-FedAvg (McMahan et al. 2018, Alg. 1, with a fixed
denominator): for clipped updates ``Δ̃_i`` (‖Δ̃_i‖₂ <= C) of the clients in a step,

    Δ̄ = ( Σ_i Δ̃_i + N(0, (z·C)² I) ) / D

where ``z`` is the noise multiplier and ``D`` is FIXED in advance: the (expected) cohort
size for FedAvg, the buffer size K for FedBuff. Dividing by the realised number or weight
of contributions instead would make the denominator itself depend on whether a user took
part, and the sensitivity analysis (one user moves the sum by <= C) would no longer hold.

Two noise sources (``NoiseSourceKind``):

``"secure"``  Gaussian draws built from the operating system's CSPRNG (``os.urandom``,
    i.e. getrandom(2); ChaCha20-based on Linux) with the Box-Muller transform. Why not a
    seeded PRNG: whoever knows (or can recover) the seed can regenerate the exact noise
    vector and subtract it from the released model, which removes the privacy entirely
    (the threat Opacus's ``_generate_noise`` names for its ``secure_mode``). A generator
    such as numpy's ``PCG64`` seeded from ``os.urandom`` is fine against an adversary who
    never sees raw outputs, but PCG64 is not a cryptographic generator (its state can be
    recovered from enough outputs; Bouillaguet et al. 2020), so we do not rely on it here:
    every uniform bit comes straight from the kernel CSPRNG. Cost: 8 bytes of urandom per
    draw (~80 MB and a fraction of a second per step for a 10M-parameter model).
    Honest limits: (1) 64-bit uniforms truncate the Gaussian at |x| <= sqrt(128 ln 2)
    ≈ 9.42 σ; with z >= 0.5 the extra failure probability this adds is below
    ``steps × P(N(0,1) > 7.4) ≈ steps × 7e-14``, far below any sensible δ. (2) Like every
    floating-point Gaussian, it does not defend against the least-significant-bit attack
    of Mironov 2012 ("On significance of the least significant bits for differential
    privacy"); a discrete Gaussian added in the integer ring of the secure-sum codec is
    the remedy for a deployment that needs that.

``"seeded"``  ``numpy.random.Generator`` (PCG64) from an explicit seed: fast and
    bit-for-bit reproducible for research. It gives NO formal privacy guarantee, because
    anyone holding the seed can subtract the noise.

For secure aggregation, where no party should add the whole noise,
:func:`distributed_noise_share` lets each client add a share.
"""

from __future__ import annotations

import math
import os
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from asyncfl.core.update import FloatVector

__all__ = [
    "NoiseSource",
    "NoiseSourceKind",
    "SecureNoise",
    "SeededNoise",
    "distributed_noise_share",
    "gaussian_noise",
    "make_noise_source",
    "noised_mean",
]

NoiseSourceKind = Literal["secure", "seeded"]
Float64Vector = npt.NDArray[np.float64]

_TWO_POW_M64 = 2.0**-64


@runtime_checkable
class NoiseSource(Protocol):
    """Something that draws i.i.d. standard normal float64 values."""

    @property
    def kind(self) -> NoiseSourceKind: ...

    def standard_normal(self, size: int) -> Float64Vector: ...


class SecureNoise:
    """Standard normals from ``os.urandom`` via Box-Muller (see the module docstring)."""

    @property
    def kind(self) -> NoiseSourceKind:
        return "secure"

    def standard_normal(self, size: int) -> Float64Vector:
        _check_size(size)
        pairs = (size + 1) // 2
        bits = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64).reshape(2, pairs)
        # u1 in (0, 1]: +1 keeps it away from 0 so log(u1) is finite; u2 in [0, 1) uses the
        # top 53 bits so it is exactly uniform on the float64 grid.
        u1 = (bits[0].astype(np.float64) + 1.0) * _TWO_POW_M64
        u2 = (bits[1] >> np.uint64(11)).astype(np.float64) * 2.0**-53
        radius = np.sqrt(-2.0 * np.log(u1))
        angle = 2.0 * math.pi * u2
        out = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])
        return out[:size]


class SeededNoise:
    """Reproducible standard normals from a seeded ``numpy.random.Generator``.

    For research only: gives no formal privacy guarantee (the seed reveals the noise).
    """

    def __init__(self, seed: int | np.random.Generator) -> None:
        if isinstance(seed, np.random.Generator):
            self._rng = seed
        elif isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0:
            self._rng = np.random.Generator(np.random.PCG64(seed))
        else:
            raise ValueError(f"seed={seed!r} must be an integer >= 0 or a numpy Generator")

    @property
    def kind(self) -> NoiseSourceKind:
        return "seeded"

    def standard_normal(self, size: int) -> Float64Vector:
        _check_size(size)
        return self._rng.standard_normal(size, dtype=np.float64)


def make_noise_source(kind: NoiseSourceKind, seed: int | None = None) -> NoiseSource:
    """The noise source a config names; ``"seeded"`` needs ``seed``, ``"secure"`` refuses one."""
    if kind == "secure":
        if seed is not None:
            raise ValueError(
                "the secure noise source takes no seed (a seed would make the noise "
                "predictable); pass seed=None or use kind='seeded'"
            )
        return SecureNoise()
    if kind == "seeded":
        if seed is None:
            raise ValueError("kind='seeded' needs a seed (an integer >= 0)")
        return SeededNoise(seed)
    raise ValueError(f"noise source kind={kind!r}; expected 'secure' or 'seeded'")


def gaussian_noise(size: int, std: float, source: NoiseSource) -> Float64Vector:
    """``size`` i.i.d. draws of N(0, std²) in float64."""
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"std={std!r} must be a finite number >= 0")
    return std * source.standard_normal(size)


def noised_mean(
    clipped_sum: FloatVector,
    *,
    noise_multiplier: float,
    clip_norm: float,
    denominator: float,
    source: NoiseSource,
) -> FloatVector:
    """``(clipped_sum + N(0, (noise_multiplier·clip_norm)²)) / denominator`` as float32.

    ``clipped_sum`` is the sum of updates each clipped to ``clip_norm``; ``denominator``
    is the FIXED expected cohort size (FedAvg) or buffer size K (FedBuff), never the
    realised count or weight sum (see the module docstring). With adaptive clipping pass
    the update's own multiplier ``z_Δ`` (:func:`asyncfl.privacy.update_noise_multiplier`).
    The sum and the noise are added in float64.
    """
    _check_noise_args(noise_multiplier, clip_norm)
    if not (math.isfinite(denominator) and denominator > 0):
        raise ValueError(
            f"denominator={denominator!r} must be a finite number > 0 "
            "(the fixed expected cohort size or buffer size K)"
        )
    if not isinstance(clipped_sum, np.ndarray) or clipped_sum.ndim != 1:
        raise ValueError("clipped_sum must be a 1-D array")
    noise = gaussian_noise(clipped_sum.shape[0], noise_multiplier * clip_norm, source)
    out = (clipped_sum.astype(np.float64) + noise) / denominator
    return out.astype(np.float32)


def distributed_noise_share(
    dim: int,
    *,
    noise_multiplier: float,
    clip_norm: float,
    min_survivors: int,
    source: NoiseSource,
) -> FloatVector:
    """One client's share of the step's noise, for secure aggregation.

    Each client adds N(0, σ² / t) with σ = noise_multiplier · clip_norm, so a sum over
    ``n`` clients carries variance ``n σ² / t``. Dropout caveat: the sum only has the target
    variance σ² if at least ``t`` shares survive; fewer survivors mean less noise and a
    weaker guarantee than the accountant reports. Therefore ``t = min_survivors`` must be
    the minimum number of clients whose contributions the protocol will ever unmask (the
    SecAgg threshold), not the expected cohort: when more survive, the sum is noisier
    than needed (safe, at some utility cost), never less noisy. A further caveat: a client
    knows its own share, so against a coalition of c clients only the other shares
    protect, i.e. variance (n - c) σ² / t; choose t (or scale up) accordingly.
    """
    _check_noise_args(noise_multiplier, clip_norm)
    if isinstance(min_survivors, bool) or not isinstance(min_survivors, int) or min_survivors < 1:
        raise ValueError(f"min_survivors={min_survivors!r} must be an integer >= 1")
    std = noise_multiplier * clip_norm / math.sqrt(min_survivors)
    return gaussian_noise(dim, std, source).astype(np.float32)


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 0:
        raise ValueError(f"size={size!r} must be an integer >= 0")


def _check_noise_args(noise_multiplier: float, clip_norm: float) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier={noise_multiplier!r} must be a finite number >= 0")
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm={clip_norm!r} must be a finite number > 0")
