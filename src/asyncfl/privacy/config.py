"""The one place that says how a run is made differentially private, and how it is accounted.

A frozen :class:`PrivacyConfig` names the mechanism (clip norm, noise multiplier, clipping
mode, noise source), the sampling model the accountant assumes, and the budget. The
choice of sampling model is explicit because it decides whether privacy amplification by
sampling may be claimed (see :mod:`asyncfl.privacy.accounting` for what each one means and
when it holds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from asyncfl.errors import ConfigError, ConfigProblem
from asyncfl.privacy.adaptive_clip import AdaptiveClipConfig, update_noise_multiplier
from asyncfl.privacy.noise import NoiseSourceKind

__all__ = ["AccountantKind", "ClippingMode", "PrivacyConfig", "SamplingScheme"]

ClippingMode = Literal["fixed", "adaptive"]
AccountantKind = Literal["rdp", "pld"]
SamplingScheme = Literal["poisson", "fixed_size", "async_approx", "none"]
"""How users enter a release, as the accountant models it.

``poisson``       sync FedAvg, each user joins a round independently with q = cohort/population.
``fixed_size``    sync FedAvg, exactly ``cohort_size`` users drawn without replacement (RDP only).
``async_approx``  FedBuff: each release treated as Poisson with q = K/population (approximation).
``none``          no amplification: every release is a full Gaussian mechanism on every user
                  (conservative; holds for any selection or timing if a user contributes at
                  most once per release).
"""


@dataclass(frozen=True)
class PrivacyConfig:
    """User-level DP for a federated run. ``validate()`` reports every bad field at once."""

    noise_multiplier: float
    """Total noise multiplier z (std of the sum's noise / clip norm), > 0. With adaptive
    clipping this is the multiplier of update and clip count together; the update's own
    noise is raised to :attr:`update_noise_multiplier`."""
    clip_norm: float
    """L2 clip norm C per user update (the initial one with adaptive clipping), > 0."""
    cohort_size: int
    """Expected cohort (poisson), exact cohort (fixed_size) or buffer size K (async): also the
    FIXED denominator of the noised mean."""
    population: int
    """Number of users the cohort is drawn from, >= cohort_size."""
    delta: float
    """Target δ, in (0, 1/population)."""
    epsilon_budget: float | None = None
    """Refuse steps that would take ε(delta) above this; null for no budget."""
    clipping: ClippingMode = "fixed"
    target_quantile: float = 0.5
    """Adaptive clipping: unclipped fraction to aim for [γ]."""
    clip_learning_rate: float = 0.2
    """Adaptive clipping: geometric step size [η_C]."""
    clipped_count_stddev: float | None = None
    """Adaptive clipping: std of the clipped-count noise [σ_b]; null for cohort_size / 20."""
    accountant: AccountantKind = "rdp"
    sampling: SamplingScheme = "poisson"
    noise_source: NoiseSourceKind = "secure"
    """``secure`` (OS CSPRNG) for deployments; ``seeded`` is reproducible, no formal guarantee."""

    @property
    def sampling_probability(self) -> float:
        """q used by the accountant: cohort_size / population, or 1 for ``none``."""
        if self.sampling == "none":
            return 1.0
        return self.cohort_size / self.population

    @property
    def effective_clipped_count_stddev(self) -> float:
        """σ_b, defaulting to the paper's cohort_size / 20."""
        if self.clipped_count_stddev is not None:
            return self.clipped_count_stddev
        return self.cohort_size / 20.0

    @property
    def update_noise_multiplier(self) -> float:
        """Multiplier of the noise added to the update sum: z, or z_Δ with adaptive clipping."""
        if self.clipping == "adaptive":
            return update_noise_multiplier(
                self.noise_multiplier, self.effective_clipped_count_stddev
            )
        return self.noise_multiplier

    def adaptive_clip_config(self) -> AdaptiveClipConfig:
        """The clip-norm update's hyperparameters (denominator = cohort_size)."""
        return AdaptiveClipConfig(
            initial_clip_norm=self.clip_norm,
            target_quantile=self.target_quantile,
            learning_rate=self.clip_learning_rate,
            clipped_count_stddev=self.effective_clipped_count_stddev,
            denominator=float(self.cohort_size),
        )

    def check(self) -> None:
        """Raise :class:`ConfigError` listing every problem, if any."""
        problems = self.validate()
        if problems:
            raise ConfigError(problems)

    def validate(self) -> list[ConfigProblem]:
        out: list[ConfigProblem] = []

        def bad(field: str, expected: str) -> None:
            out.append(ConfigProblem(field, getattr(self, field), expected))

        if not _positive(self.noise_multiplier):
            bad("noise_multiplier", "a number > 0 (omit the privacy section to turn DP off)")
        if not _positive(self.clip_norm):
            bad("clip_norm", "a number > 0")
        sizes_ok = True
        if not _int_at_least(self.cohort_size, 1):
            bad("cohort_size", "an integer >= 1")
            sizes_ok = False
        if not _int_at_least(self.population, 1):
            bad("population", "an integer >= 1")
            sizes_ok = False
        if sizes_ok and self.cohort_size > self.population:
            bad("cohort_size", f"an integer <= population ({self.population})")
        if not (_finite(self.delta) and 0 < self.delta < 1):
            bad("delta", "a number in (0, 1)")
        elif sizes_ok and self.delta >= 1 / self.population:
            # δ >= 1/n admits "publish one random user's data" as (0, δ)-DP.
            bad("delta", f"a number < 1/population = {1 / self.population:.3g}")
        if self.epsilon_budget is not None and not _positive(self.epsilon_budget):
            bad("epsilon_budget", "null or a number > 0")
        for field, literal in (
            ("clipping", ClippingMode),
            ("accountant", AccountantKind),
            ("sampling", SamplingScheme),
            ("noise_source", NoiseSourceKind),
        ):
            allowed = get_args(literal)
            if getattr(self, field) not in allowed:
                bad(field, "one of " + ", ".join(repr(a) for a in allowed))
        if not (_finite(self.target_quantile) and 0 < self.target_quantile < 1):
            bad("target_quantile", "a number in (0, 1)")
        if not _positive(self.clip_learning_rate):
            bad("clip_learning_rate", "a number > 0")
        sigma_b = self.clipped_count_stddev
        if sigma_b is not None and not (_finite(sigma_b) and sigma_b >= 0):
            bad("clipped_count_stddev", "null or a number >= 0")
        elif (
            self.clipping == "adaptive"
            and _positive(self.noise_multiplier)
            and (sigma_b is not None or sizes_ok)
            and not 2 * self.effective_clipped_count_stddev > self.noise_multiplier
        ):
            bad(
                "clipped_count_stddev",
                f"a number > noise_multiplier / 2 = {self.noise_multiplier / 2:g} "
                f"(effective value {self.effective_clipped_count_stddev:g}); adaptive "
                "clipping cannot keep the total noise multiplier otherwise",
            )
        if self.accountant == "pld" and self.sampling == "fixed_size":
            bad(
                "accountant",
                "'rdp' with sampling='fixed_size' (dp-accounting's PLD accountant does not "
                "support sampling without replacement)",
            )
        return out


def _finite(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _positive(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _int_at_least(x: object, low: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low
