"""Adaptive clipping to a target quantile of update norms (Andrew et al., NeurIPS 2021).

"Differentially Private Learning with Adaptive Clipping", Alg. 1 / Sec. 3. Each client in a
step reports, besides its update clipped to the current norm ``C``, a bit
``b_i = 1[‖Δ_i‖₂ <= C]``. The server estimates the unclipped fraction privately and moves
``C`` geometrically toward the ``γ``-quantile of the norms:

    b̄      = ( Σ_i (b_i - 1/2) + N(0, σ_b²) ) / m  +  1/2                     (centred count)
    C_next  = C · exp( -η_C · (b̄ - γ) )                                        (geometric step)

``m`` is the same FIXED denominator as the update's mean (expected cohort size, or K).
Clients send the centred bit ``b_i - 1/2`` so that one user changes the sum by at most 1/2
(add/remove adjacency); the count query is then a Gaussian mechanism with noise multiplier
``2 σ_b``.

Privacy (Sec. 3.1, Theorem 1): releasing the update with noise multiplier ``z_Δ`` and the
count with multiplier ``2 σ_b`` composes exactly (in RDP, and as Gaussians) like ONE
Gaussian mechanism with ``z^-2 = z_Δ^-2 + (2 σ_b)^-2``. To keep the stated total ``z``
the update's own multiplier is therefore raised to

    z_Δ = ( z^-2 - (2 σ_b)^-2 )^(-1/2),      which needs  σ_b > z / 2.

The accountant records the total ``z`` (the ``effective`` multiplier), so the count's
privacy cost is accounted; the noise added to the update uses ``z_Δ``. The paper's default
``σ_b = m / 20`` makes ``z_Δ`` only slightly larger than ``z``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypedDict

from asyncfl.errors import ConfigError, ConfigProblem
from asyncfl.privacy.noise import NoiseSource

__all__ = [
    "AdaptiveClipConfig",
    "AdaptiveClipState",
    "AdaptiveClipStateDict",
    "centred_unclipped_bit",
    "next_clip_norm",
    "noised_unclipped_fraction",
    "total_noise_multiplier",
    "update_noise_multiplier",
]


class AdaptiveClipStateDict(TypedDict):
    clip_norm: float
    steps: int


def update_noise_multiplier(total_noise_multiplier: float, clipped_count_stddev: float) -> float:
    """The update's multiplier ``z_Δ = (z^-2 - (2σ_b)^-2)^(-1/2)`` so the total stays ``z``.

    ``z = 0`` (no DP) gives 0. Raises ``ValueError`` unless ``σ_b > z/2`` (otherwise the
    count alone would spend more than the whole budget).
    """
    z, sigma_b = total_noise_multiplier, clipped_count_stddev
    if not (math.isfinite(z) and z >= 0):
        raise ValueError(f"total noise multiplier z={z!r} must be a finite number >= 0")
    if not (math.isfinite(sigma_b) and sigma_b >= 0):
        raise ValueError(f"clipped_count_stddev={sigma_b!r} must be a finite number >= 0")
    if z == 0:
        return 0.0
    if not 2 * sigma_b > z:
        raise ValueError(
            f"clipped_count_stddev={sigma_b} must exceed noise_multiplier/2 = {z / 2}; "
            f"the paper suggests expected clients per step / 20"
        )
    return float((z**-2 - (2 * sigma_b) ** -2) ** -0.5)


def total_noise_multiplier(update_multiplier: float, clipped_count_stddev: float) -> float:
    """Inverse of :func:`update_noise_multiplier`: ``z = (z_Δ^-2 + (2σ_b)^-2)^(-1/2)``."""
    if update_multiplier == 0 or clipped_count_stddev == 0:
        return 0.0
    return float((update_multiplier**-2 + (2 * clipped_count_stddev) ** -2) ** -0.5)


@dataclass(frozen=True)
class AdaptiveClipConfig:
    """Hyperparameters of the clip-norm update (symbols of Andrew et al. 2021 in brackets)."""

    initial_clip_norm: float
    """Starting clip norm [C_0], > 0."""
    target_quantile: float = 0.5
    """Fraction of updates that should be unclipped [γ], in (0, 1)."""
    learning_rate: float = 0.2
    """Geometric step size [η_C], > 0; the paper uses 0.2."""
    clipped_count_stddev: float = 0.0
    """Std of the noise on the centred count [σ_b], >= 0; paper default m / 20."""
    denominator: float = 1.0
    """Fixed expected number of contributions per step [m], > 0 (same as the update's)."""

    def validate(self) -> list[ConfigProblem]:
        out: list[ConfigProblem] = []
        if not _positive(self.initial_clip_norm):
            out.append(ConfigProblem("initial_clip_norm", self.initial_clip_norm, "a number > 0"))
        if not (_finite(self.target_quantile) and 0 < self.target_quantile < 1):
            out.append(ConfigProblem("target_quantile", self.target_quantile, "a number in (0, 1)"))
        if not _positive(self.learning_rate):
            out.append(ConfigProblem("learning_rate", self.learning_rate, "a number > 0"))
        if not (_finite(self.clipped_count_stddev) and self.clipped_count_stddev >= 0):
            out.append(
                ConfigProblem("clipped_count_stddev", self.clipped_count_stddev, "a number >= 0")
            )
        if not _positive(self.denominator):
            out.append(ConfigProblem("denominator", self.denominator, "a number > 0"))
        return out


def centred_unclipped_bit(norm: float, clip_norm: float) -> float:
    """The client's report ``b_i - 1/2``: +1/2 if ``norm <= clip_norm`` else -1/2."""
    return 0.5 if norm <= clip_norm else -0.5


def noised_unclipped_fraction(
    sum_centred_bits: float, config: AdaptiveClipConfig, source: NoiseSource
) -> float:
    """``b̄ = (Σ(b_i - 1/2) + N(0, σ_b²)) / m + 1/2`` from the (secure) sum of centred bits."""
    if not math.isfinite(sum_centred_bits):
        raise ValueError(f"sum_centred_bits={sum_centred_bits!r} must be finite")
    noise = config.clipped_count_stddev * float(source.standard_normal(1)[0])
    return (sum_centred_bits + noise) / config.denominator + 0.5


def next_clip_norm(
    clip_norm: float, unclipped_fraction: float, config: AdaptiveClipConfig
) -> float:
    """``C · exp(-η_C (b̄ - γ))``: shrink when more than γ were unclipped, grow when fewer."""
    error = unclipped_fraction - config.target_quantile
    return clip_norm * math.exp(-config.learning_rate * error)


class AdaptiveClipState:
    """The current clip norm and the number of updates of it; checkpointable."""

    def __init__(self, config: AdaptiveClipConfig) -> None:
        problems = config.validate()
        if problems:
            raise ConfigError(problems)
        self._config = config
        self._clip_norm = float(config.initial_clip_norm)
        self._steps = 0

    @property
    def config(self) -> AdaptiveClipConfig:
        return self._config

    @property
    def clip_norm(self) -> float:
        """The norm to clip this step's updates to."""
        return self._clip_norm

    @property
    def steps(self) -> int:
        return self._steps

    def step(self, sum_centred_bits: float, source: NoiseSource) -> float:
        """Apply one server step's (noised) count and return the new clip norm."""
        fraction = noised_unclipped_fraction(sum_centred_bits, self._config, source)
        new = next_clip_norm(self._clip_norm, fraction, self._config)
        if not (math.isfinite(new) and new > 0):
            raise ValueError(
                f"clip norm update gave {new!r} from C={self._clip_norm}, b̄={fraction}; "
                "lower learning_rate"
            )
        self._clip_norm = new
        self._steps += 1
        return new

    def state_dict(self) -> AdaptiveClipStateDict:
        return {"clip_norm": self._clip_norm, "steps": self._steps}

    def load_state_dict(self, state: AdaptiveClipStateDict) -> None:
        """Restore a checkpoint; validates everything before changing anything."""
        clip_norm: object = state.get("clip_norm")
        steps: object = state.get("steps")
        problems: list[ConfigProblem] = []
        if not (isinstance(clip_norm, int | float) and _positive(clip_norm)):
            problems.append(ConfigProblem("clip_norm", clip_norm, "a number > 0"))
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            problems.append(ConfigProblem("steps", steps, "an integer >= 0"))
        if problems or not isinstance(clip_norm, int | float) or not isinstance(steps, int):
            raise ConfigError(problems)
        self._clip_norm = float(clip_norm)
        self._steps = steps


def _finite(x: float) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _positive(x: float) -> bool:
    return _finite(x) and x > 0
