"""User-level differential privacy in a simulation (DP-FedAvg, McMahan et al. 2018; DP-FedBuff).

Per server step: every client clips its update to L2 norm C on the device; the server sums
the clipped updates (staleness weights <= 1, example weights equal, so one user moves the
sum by at most C), adds N(0, (z C)^2) once, and divides by a FIXED denominator (cohort
size C for FedAvg, buffer size K for FedBuff, 1 for FedAsync), never by the realised
count; the accountant records one release per step and refuses a step past the budget.
With adaptive clipping (Andrew et al. 2021) each update also reports the bit
``norm <= C``; their noised mean moves C towards the target quantile after every step.

Where the noise is added depends on the secure mode:
- none: by the aggregator (a trusted server), as this module's :meth:`DPMechanism.__call__`;
- tee: inside the enclave, once per release (``EnclaveConfig.noise_std``, in the fixed-point
  ring), so the server never holds an un-noised sum; the aggregator
  (:class:`~asyncfl.algorithms.secure_fedbuff.SecureFedBuff`) uses this mechanism's budget
  check, accountant and fixed denominator (:meth:`check_budget`, :meth:`record_release`);
  adaptive clipping is refused there (the noise std is part of the enclave's attested
  configuration, fixed at boot);
- secagg / secagg+: distributed among the clients (site ``clients``): each client adds a share
  N(0, (z C)^2 / m) to its clipped update before encoding and masking, where m is the
  round's ``min_updates``; the server never unmasks a sum of fewer than m inputs, so every
  released sum carries at least the target variance and nobody sees an un-noised sum. The
  aggregator then only divides by the fixed denominator and accounts the release. The shares
  are continuous Gaussians rounded into the fixed-point ring (not a discrete Gaussian): the
  rounding is within the codec's stated error bound; adaptive clipping is refused (its
  unclipped count would need a secure sum of its own);
- lightsecagg: not wired yet; the config refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from asyncfl.core.update import FloatVector
from asyncfl.errors import ConfigProblem, PrivacyBudgetExceeded
from asyncfl.privacy import (
    AdaptiveClipState,
    NoiseSource,
    PrivacyAccountant,
    PrivacyConfig,
    centred_unclipped_bit,
    clip_update,
    distributed_noise_share,
    make_noise_source,
    noised_mean,
)
from asyncfl.privacy.config import AccountantKind, ClippingMode, SamplingScheme

__all__ = ["DPMechanism", "DPSection", "NoiseSite"]

NoiseSite = Literal["server", "enclave", "clients"]
"""Who adds the noise: the aggregator, the TEE enclave on release, or every client a share
(distributed noise under SecAgg: the server only ever sees the noised sum)."""
"""Who adds the Gaussian noise: the aggregator, or the TEE secure buffer's enclave."""


@dataclass(frozen=True)
class DPSection:
    enabled: bool = False
    """Train with user-level differential privacy. Noise is added by the server, or, with
    secure_aggregation.mode tee, inside the enclave (fixed clipping only)."""
    noise_multiplier: float = 1.0
    """z: std of the noise added to each step's sum, in units of the clip norm."""
    clip_norm: float = 1.0
    """C: L2 bound of every client update (the initial one with adaptive clipping)."""
    delta: float | None = None
    """delta of the reported (epsilon, delta); null: 1 / (10 * population)."""
    epsilon_budget: float | None = None
    """Stop training before a step would take epsilon above this; null: no budget."""
    clipping: ClippingMode = "fixed"
    """fixed, or adaptive (Andrew et al. 2021: C tracks a quantile of update norms)."""
    target_quantile: float = 0.5
    """Adaptive clipping: fraction of updates that should be unclipped."""
    clip_learning_rate: float = 0.2
    """Adaptive clipping: geometric step size of C."""
    clipped_count_stddev: float | None = None
    """Adaptive clipping: noise std of the unclipped count; null: cohort / 20."""
    accountant: AccountantKind = "rdp"
    """rdp or pld (dp-accounting)."""
    sampling: Literal["auto"] | SamplingScheme = "auto"
    """Amplification assumed by the accountant. auto: fixed_size (q = C / N, replace-one)
    for FedAvg, async_approx (one Poisson-sampled Gaussian per release, q = K / N) for
    FedBuff / FedAsync; none: no amplification (conservative)."""
    noise_source: Literal["secure", "seeded"] = "secure"
    """secure: OS CSPRNG; seeded: reproducible, for research, NO formal guarantee."""

    def validate(self) -> list[ConfigProblem]:
        out: list[ConfigProblem] = []
        if not self.noise_multiplier > 0:
            out.append(ConfigProblem("noise_multiplier", self.noise_multiplier, "a number > 0"))
        if not self.clip_norm > 0:
            out.append(ConfigProblem("clip_norm", self.clip_norm, "a number > 0"))
        if self.epsilon_budget is not None and not self.epsilon_budget > 0:
            out.append(ConfigProblem("epsilon_budget", self.epsilon_budget, "null or > 0"))
        return out

    def privacy_config(self, cohort: int, population: int, sync: bool) -> PrivacyConfig:
        sampling: SamplingScheme
        if self.sampling == "auto":
            sampling = "fixed_size" if sync else "async_approx"
        else:
            sampling = self.sampling
        return PrivacyConfig(
            noise_multiplier=self.noise_multiplier,
            clip_norm=self.clip_norm,
            cohort_size=cohort,
            population=population,
            delta=self.delta if self.delta is not None else 1.0 / (10.0 * population),
            epsilon_budget=self.epsilon_budget,
            clipping=self.clipping,
            target_quantile=self.target_quantile,
            clip_learning_rate=self.clip_learning_rate,
            clipped_count_stddev=self.clipped_count_stddev,
            accountant=self.accountant,
            sampling=sampling,
            noise_source=self.noise_source,
        )


class DPMechanism:
    """Client-side clipping plus the server's noised, fixed-denominator step (a Finalizer)."""

    def __init__(
        self,
        cfg: PrivacyConfig,
        noise_seed: int,
        site: NoiseSite = "server",
        min_survivors: int = 1,
    ) -> None:
        cfg.check()
        if site == "enclave" and cfg.clipping != "fixed":
            raise ValueError(
                "adaptive clipping with noise added in the enclave is not supported: the "
                "enclave's noise std is fixed at boot (use clipping='fixed')"
            )
        if site == "clients" and cfg.clipping != "fixed":
            raise ValueError(
                "adaptive clipping with distributed noise is not supported: the unclipped "
                "count would need its own secure sum (use clipping='fixed')"
            )
        if min_survivors < 1:
            raise ValueError(f"min_survivors={min_survivors} must be >= 1")
        self.cfg = cfg
        self.site: NoiseSite = site
        self.min_survivors = min_survivors
        """Distributed noise: the fewest shares any released sum contains (the server never
        steps with fewer), so each client adds variance (z C)^2 / min_survivors."""
        self.accountant = PrivacyAccountant(cfg)
        self.source: NoiseSource = make_noise_source(
            cfg.noise_source, noise_seed if cfg.noise_source == "seeded" else None
        )
        self.adaptive = (
            AdaptiveClipState(cfg.adaptive_clip_config()) if cfg.clipping == "adaptive" else None
        )
        self._pending_bits: list[float] = []

    @property
    def clip_norm(self) -> float:
        return self.adaptive.clip_norm if self.adaptive is not None else self.cfg.clip_norm

    def clip(self, delta: FloatVector) -> FloatVector:
        """On the device: clip to the current C and remember the unclipped bit."""
        clipped, norm = clip_update(delta, self.clip_norm)
        self._pending_bits.append(centred_unclipped_bit(norm, self.clip_norm))
        return clipped

    def forget_last(self) -> None:
        """The last clipped update was rejected: its bit is not part of any step."""
        self._pending_bits.pop()

    def forget_pending(self) -> None:
        """The buffered updates were discarded without a step."""
        self._pending_bits.clear()

    @property
    def fixed_denominator(self) -> float:
        """D of the noised mean: cohort size (FedAvg), buffer size K (FedBuff), 1 (FedAsync)."""
        return float(self.cfg.cohort_size)

    def check_budget(self) -> None:
        """Raise :class:`PrivacyBudgetExceeded` if one more release would pass the budget."""
        if self.accountant.would_exceed():
            raise PrivacyBudgetExceeded(
                f"the next step would take epsilon above the budget {self.cfg.epsilon_budget} "
                f"(spent {self.accountant.epsilon():.4g} at delta={self.cfg.delta:g})"
            )

    def record_release(self) -> None:
        """Account one noised release whose noise someone else (the enclave) added."""
        self.accountant.record_step()
        self._pending_bits.clear()

    def noise_share(self, dim: int) -> FloatVector:
        """On the device (distributed noise): this client's share of the step's noise."""
        if self.site != "clients":
            raise RuntimeError(f"noise is added by the {self.site}, not by the clients")
        return distributed_noise_share(
            dim,
            noise_multiplier=self.cfg.noise_multiplier,
            clip_norm=self.clip_norm,
            min_survivors=self.min_survivors,
            source=self.source,
        )

    def __call__(self, weighted_sum: FloatVector, example_total: float, count: int) -> FloatVector:
        if self.site == "clients":
            # The sum already carries the clients' noise shares: divide by the fixed
            # denominator, account the release.
            if count < self.min_survivors:
                raise RuntimeError(
                    f"a sum of {count} shares carries less than the target noise "
                    f"(needs >= {self.min_survivors}); the round must fail instead"
                )
            self.check_budget()
            out = (weighted_sum.astype(np.float64) / self.fixed_denominator).astype(np.float32)
            self.record_release()
            return out
        if self.site != "server":
            raise RuntimeError("the noise of this mechanism is added in the enclave")
        self.check_budget()
        out = noised_mean(
            weighted_sum,
            noise_multiplier=self.cfg.update_noise_multiplier,
            clip_norm=self.clip_norm,
            denominator=float(self.cfg.cohort_size),
            source=self.source,
        )
        self.accountant.record_step()
        if self.adaptive is not None:
            self.adaptive.step(sum(self._pending_bits), self.source)
        self._pending_bits.clear()
        return out

    def summary(self) -> dict[str, object]:
        return {
            "epsilon": self.accountant.epsilon(),
            "delta": self.cfg.delta,
            "steps": self.accountant.steps,
            "noise_multiplier": self.cfg.noise_multiplier,
            "clip_norm": self.clip_norm,
            "clipping": self.cfg.clipping,
            "accountant": self.cfg.accountant,
            "sampling": self.cfg.sampling,
            "sampling_probability": self.cfg.sampling_probability,
            "noise_source": self.cfg.noise_source,
            "noise_added_in": self.site,
            "formal_guarantee": self.cfg.noise_source == "secure",
        }
