"""The simulation config: every section, validated in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from asyncfl.algorithms.factory import AlgorithmConfig
from asyncfl.algorithms.fedasync import FedAsyncConfig
from asyncfl.algorithms.fedavg import FedAvgConfig
from asyncfl.algorithms.fedbuff import FedBuffConfig
from asyncfl.core.server_opt import ServerOptimizerConfig
from asyncfl.data.registry import DataConfig
from asyncfl.errors import ConfigProblem
from asyncfl.models.config import ModelConfig
from asyncfl.secure.lightsecagg.field import P as LIGHTSECAGG_P
from asyncfl.sim.devices import SyntheticPopulationConfig
from asyncfl.sim.dp import DPSection
from asyncfl.sim.phones import PhonePopulationConfig
from asyncfl.sim.secure_rounds import SecureAggregationConfig
from asyncfl.training.config import ClientConfig

__all__ = ["PopulationConfig", "RunConfig", "SimConfig", "distributed_noise_problems"]


@dataclass(frozen=True)
class PopulationConfig:
    kind: Literal["synthetic", "phones"] = "synthetic"
    """synthetic: lognormal device speeds; phones: the real phone population (FLASH trace),
    falling back to synthetic with a message when its files are absent."""
    synthetic: SyntheticPopulationConfig = field(default_factory=SyntheticPopulationConfig)
    """Parameters of the synthetic population (also the fallback of ``phones``)."""
    phones: PhonePopulationConfig = field(default_factory=PhonePopulationConfig)
    """Parameters of the real phone population."""


@dataclass(frozen=True)
class RunConfig:
    max_server_steps: int | None = 100
    """Stop after this many server steps (model versions)."""
    max_client_updates: int | None = None
    """Stop after this many accepted client updates."""
    max_sim_time_s: float | None = None
    """Stop at this simulated time (seconds)."""
    eval_every: int = 10
    """Evaluate every this many server steps (and always at the end)."""
    eval_batch_size: int = 2048
    """Batch size of evaluation."""
    target_metric: str | None = None
    """Stop once this evaluation metric reaches ``target_value``."""
    target_value: float | None = None
    """Value of ``target_metric`` that ends the run."""
    target_mode: Literal["max", "min"] = "max"
    """max: stop when metric >= target (accuracy); min: when <= (perplexity)."""
    torch_threads: int = 1
    """Intra-op threads while the run trains. Clients train one small batch at a time, where
    extra threads only add synchronisation (measured 28x slower with 2 threads on 2 busy
    cores); the previous setting is restored when the run ends."""

    def validate(self) -> list[ConfigProblem]:
        out: list[ConfigProblem] = []
        limits = (self.max_server_steps, self.max_client_updates, self.max_sim_time_s)
        if all(v is None for v in limits) and self.target_metric is None:
            out.append(
                ConfigProblem(
                    "max_server_steps",
                    None,
                    "at least one of max_server_steps, max_client_updates, max_sim_time_s, "
                    "target_metric so the run ends",
                )
            )
        for name in ("max_server_steps", "max_client_updates"):
            v = getattr(self, name)
            if v is not None and v < 1:
                out.append(ConfigProblem(name, v, "null or an integer >= 1"))
        if self.max_sim_time_s is not None and self.max_sim_time_s <= 0:
            out.append(ConfigProblem("max_sim_time_s", self.max_sim_time_s, "null or > 0"))
        if self.eval_every < 1:
            out.append(ConfigProblem("eval_every", self.eval_every, "an integer >= 1"))
        if self.torch_threads < 1:
            out.append(ConfigProblem("torch_threads", self.torch_threads, "an integer >= 1"))
        if self.eval_batch_size < 1:
            out.append(ConfigProblem("eval_batch_size", self.eval_batch_size, "an integer >= 1"))
        if (self.target_metric is None) != (self.target_value is None):
            out.append(
                ConfigProblem("target_value", self.target_value, "set together with target_metric")
            )
        return out


@dataclass(frozen=True)
class SimConfig:
    seed: int = 0
    """Seeds every random stream (data, devices, selection, training); same seed, same run."""
    data: DataConfig = field(default_factory=DataConfig)
    """Dataset and its client partition."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model architecture."""
    client: ClientConfig = field(default_factory=ClientConfig)
    """Local training on each client."""
    server_optimizer: ServerOptimizerConfig = field(default_factory=ServerOptimizerConfig)
    """How the server applies the aggregated delta."""
    algorithm: AlgorithmConfig = field(default_factory=FedBuffConfig)
    """fedbuff, fedavg or fedasync, chosen by ``name``."""
    population: PopulationConfig = field(default_factory=PopulationConfig)
    """Devices: speed, bandwidth, availability, dropouts."""
    run: RunConfig = field(default_factory=RunConfig)
    """When to stop and how often to evaluate."""
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    """Secure aggregation: SecAgg rounds (FedAvg) or the TEE secure buffer (FedBuff, FedAsync);
    the server learns only sums."""
    privacy: DPSection = field(default_factory=DPSection)
    """User-level differential privacy (clipping, noise, accounting)."""

    def validate(self) -> list[ConfigProblem]:
        out: list[ConfigProblem] = []
        mode = self.secure_aggregation.mode
        if mode in ("secagg", "secagg+"):
            if not isinstance(self.algorithm, FedAvgConfig):
                out.append(
                    ConfigProblem(
                        "secure_aggregation.mode",
                        mode,
                        f"'none' or 'tee' with algorithm {self.algorithm.name!r}: SecAgg needs "
                        "synchronous rounds (algorithm.name: fedavg)",
                    )
                )
        elif mode in ("tee", "lightsecagg") and isinstance(self.algorithm, FedAvgConfig):
            out.append(
                ConfigProblem(
                    "secure_aggregation.mode",
                    mode,
                    f"secagg or secagg+ with algorithm 'fedavg': {mode} serves the "
                    "asynchronous algorithms (fedbuff, fedasync)",
                )
            )
        elif mode == "lightsecagg" and not isinstance(self.algorithm, FedAvgConfig):
            out += _lightsecagg_headroom(self.secure_aggregation, self.algorithm)
        if (
            mode != "none"
            and not isinstance(self.algorithm, FedAsyncConfig)
            and self.algorithm.example_weighting not in ("equal", "linear")
        ):
            out.append(
                ConfigProblem(
                    "algorithm.example_weighting",
                    self.algorithm.example_weighting,
                    "equal or linear with secure aggregation (integer weights in the ring)",
                )
            )
        if self.privacy.enabled:
            weighting = getattr(self.algorithm, "example_weighting", "equal")
            if weighting != "equal":
                out.append(
                    ConfigProblem(
                        "algorithm.example_weighting",
                        weighting,
                        "equal with differential privacy (a user's weight must be <= 1)",
                    )
                )
            if mode in ("secagg", "secagg+"):
                out += distributed_noise_problems(
                    self.privacy, self.secure_aggregation, self.algorithm
                )
            elif mode == "lightsecagg":
                out.append(
                    ConfigProblem(
                        "privacy.enabled",
                        True,
                        "false with secure_aggregation.mode='lightsecagg': distributed DP "
                        "noise for LightSecAgg is not implemented yet",
                    )
                )
            elif mode == "tee" and self.privacy.clipping != "fixed":
                out.append(
                    ConfigProblem(
                        "privacy.clipping",
                        self.privacy.clipping,
                        "fixed with secure_aggregation.mode='tee': the enclave adds the noise "
                        "with a std fixed in its attested configuration at boot, so the clip "
                        "norm cannot adapt during the run",
                    )
                )
        return out


def distributed_noise_problems(
    dp: DPSection, sa: SecureAggregationConfig, algorithm: AlgorithmConfig
) -> list[ConfigProblem]:
    """DP with SecAgg: each client adds a noise share before encoding (fixed clipping).

    Shared by the simulator's and the service's config checks."""
    out: list[ConfigProblem] = []
    if dp.clipping != "fixed":
        out.append(
            ConfigProblem(
                "privacy.clipping",
                dp.clipping,
                "fixed with SecAgg (distributed noise); adaptive clipping would need a "
                "secure sum of the unclipped count",
            )
        )
    if isinstance(algorithm, FedAvgConfig):
        # Each coordinate of a client's input is its clipped delta plus a noise share of
        # std z C / sqrt(min_updates); the fixed-point range must hold it with margin,
        # or the codec's per-coordinate clipping would cut the noise.
        share_std = dp.noise_multiplier * dp.clip_norm / algorithm.min_updates**0.5
        need = dp.clip_norm + 6.0 * share_std
        if sa.clip < need:
            out.append(
                ConfigProblem(
                    "secure_aggregation.clip",
                    sa.clip,
                    f">= clip_norm + 6 x noise-share std = {need:.3g} "
                    f"(z={dp.noise_multiplier}, C={dp.clip_norm}, "
                    f"min_updates={algorithm.min_updates})",
                )
            )
    return out


def _lightsecagg_headroom(
    sec: SecureAggregationConfig, alg: FedBuffConfig | FedAsyncConfig
) -> list[ConfigProblem]:
    """K contributions of weight 2^weight_bits (example weight 1; the factory re-checks the
    largest example weight) must not wrap in F_p: K 2^S ceil(clip 2^f) <= (p - 1) / 2."""
    if not (sec.clip > 0 and 0 <= sec.frac_bits <= 52 and 0 <= sec.weight_bits <= 24):
        return []  # reported by SecureAggregationConfig.validate
    k = alg.buffer_size if isinstance(alg, FedBuffConfig) else 1
    need = max(k, 1) * (1 << sec.weight_bits) * math.ceil(sec.clip * 2.0**sec.frac_bits)
    if need <= (LIGHTSECAGG_P - 1) // 2:
        return []
    spare = math.ceil(math.log2(need / ((LIGHTSECAGG_P - 1) // 2)))
    return [
        ConfigProblem(
            "secure_aggregation.frac_bits",
            sec.frac_bits,
            f"<= {sec.frac_bits - spare} with mode 'lightsecagg' (or lower weight_bits by "
            f"{spare}): K * 2^weight_bits * clip * 2^frac_bits = {need} must stay below p/2 "
            "(p = 2^32 - 5), e.g. frac_bits: 16 and weight_bits: 6 for K <= 32",
        )
    ]
