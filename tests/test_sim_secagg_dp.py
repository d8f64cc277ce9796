"""Distributed DP noise under SecAgg: each client adds a share; the server sees noised sums."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from asyncfl.algorithms import FedAvgConfig
from asyncfl.core.configload import build_config
from asyncfl.data.synthetic import synthetic_fedprox
from asyncfl.errors import ConfigError
from asyncfl.sim.config import RunConfig, SimConfig
from asyncfl.sim.dp import DPSection
from asyncfl.sim.factory import build_simulator
from asyncfl.sim.secure_rounds import SecureAggregationConfig

N, C_CLIP, Z, COHORT = 30, 0.05, 1.0, 10


def _cfg(stage_dropout: float = 0.0, steps: int = 1) -> SimConfig:
    return SimConfig(
        seed=3,
        algorithm=FedAvgConfig(cohort_size=COHORT, min_updates=COHORT, example_weighting="equal"),
        run=RunConfig(max_server_steps=steps, max_sim_time_s=1e6),
        secure_aggregation=SecureAggregationConfig(
            mode="secagg", clip=1.0, stage_dropout_prob=stage_dropout
        ),
        privacy=DPSection(
            enabled=True, clip_norm=C_CLIP, noise_multiplier=Z, noise_source="seeded"
        ),
    )


def test_released_sum_carries_the_target_noise() -> None:
    data = synthetic_fedprox(num_clients=N, size_mean=2.5, seed=1)
    sim = build_simulator(_cfg(), data=data)
    assert sim.dp is not None and sim.dp.site == "clients"
    clipped: list[np.ndarray] = []
    shares: list[np.ndarray] = []
    clip, share = sim.dp.clip, sim.dp.noise_share

    def spy_clip(delta: np.ndarray) -> np.ndarray:
        clipped.append(clip(delta))
        return clipped[-1]

    def spy_share(dim: int) -> np.ndarray:
        shares.append(share(dim))
        return shares[-1]

    sim.dp.clip = spy_clip  # type: ignore[method-assign]
    sim.dp.noise_share = spy_share  # type: ignore[method-assign]
    x0 = sim.agg.params.astype(np.float64).copy()
    r = sim.run()
    assert r.server_steps == 1 and len(shares) == COHORT
    noise = np.sum(shares, axis=0)
    # COHORT shares of std z C / sqrt(min_updates = COHORT): the sum has std z C. With
    # ~600 coordinates the sample std is within 15% of it (about 3.5 standard errors).
    assert np.std(noise) == pytest.approx(Z * C_CLIP, rel=0.15)
    expected = x0 - (np.sum(clipped, axis=0) + noise) / COHORT
    bound = r.secure["decode_error_bound"]  # type: ignore[index]
    assert np.abs(sim.agg.params - expected).max() <= bound + 1e-6
    assert r.privacy is not None and r.privacy["noise_added_in"] == "clients"
    assert r.privacy["steps"] == 1 and r.privacy["epsilon"] > 0  # type: ignore[operator]


def test_never_releases_a_sum_with_fewer_shares_than_calibrated() -> None:
    data = synthetic_fedprox(num_clients=N, size_mean=2.5, seed=1)
    sim = build_simulator(_cfg(stage_dropout=0.05, steps=3), data=data)
    counts: list[int] = []
    inner = sim.agg.on_aggregate

    def spy(base_version: int, weighted_sum: Any, example_total: float, count: int) -> Any:
        counts.append(count)
        return inner(base_version, weighted_sum, example_total, count)

    sim.agg.on_aggregate = spy  # type: ignore[method-assign]
    r = sim.run()
    assert all(c >= COHORT for c in counts)
    assert r.secure is not None and r.secure["failed_rounds"] > 0  # type: ignore[operator]
    assert r.privacy is not None and r.privacy["steps"] == r.server_steps


def test_config_rules_for_distributed_noise() -> None:
    base: dict[str, Any] = {
        "algorithm": {
            "name": "fedavg",
            "cohort_size": 10,
            "min_updates": 4,
            "example_weighting": "equal",
        },
        "secure_aggregation": {"mode": "secagg+", "clip": 0.2},
        "privacy": {"enabled": True, "clip_norm": 0.1, "noise_multiplier": 1.0},
    }
    with pytest.raises(ConfigError, match=r"secure_aggregation\.clip"):
        build_config(SimConfig, base)  # 0.1 + 6 * 0.1 / 2 = 0.4 > 0.2
    ok = build_config(SimConfig, {**base, "secure_aggregation": {"mode": "secagg+", "clip": 0.5}})
    assert ok.privacy.enabled
    with pytest.raises(ConfigError, match=r"privacy\.clipping"):
        build_config(
            SimConfig,
            {
                **base,
                "secure_aggregation": {"mode": "secagg", "clip": 1.0},
                "privacy": {"enabled": True, "clip_norm": 0.1, "clipping": "adaptive"},
            },
        )
