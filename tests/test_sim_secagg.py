"""Synchronous FedAvg through SecAgg / SecAgg+ in the simulator."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from asyncfl.algorithms import FedAvgConfig
from asyncfl.core.configload import build_config
from asyncfl.data.synthetic import synthetic_fedprox
from asyncfl.errors import ConfigError
from asyncfl.sim.config import RunConfig, SimConfig
from asyncfl.sim.devices import DAY_S, DevicePopulation
from asyncfl.sim.factory import build_simulator
from asyncfl.sim.secure_rounds import SecureAggregationConfig
from asyncfl.training.config import ClientConfig

N = 20


def _pop(n: int) -> DevicePopulation:
    return DevicePopulation(
        sec_per_example=np.linspace(0.01, 0.05, n),
        downlink_bps=np.full(n, 1e6),
        uplink_bps=np.full(n, 1e6),
        dropout_prob=np.zeros(n),
        window_start_s=np.zeros(n),
        window_length_s=np.full(n, DAY_S),
        speed_score=np.ones(n),
    )


def _cfg(mode: str, **secure: float) -> SimConfig:
    return SimConfig(
        seed=1,
        algorithm=FedAvgConfig(cohort_size=6, over_selection=0.3, example_weighting="linear"),
        client=ClientConfig(batch_size=8, lr=0.05),
        run=RunConfig(max_server_steps=3, eval_every=3),
        secure_aggregation=SecureAggregationConfig(mode=mode, **secure),  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("mode", ["secagg", "secagg+"])
def test_secure_trajectory_matches_plaintext_within_codec_bound(mode: str) -> None:
    data = synthetic_fedprox(num_clients=N, size_mean=2.5, seed=4)
    plain = build_simulator(_cfg("none"), data=data, population=_pop(N))
    secure = build_simulator(_cfg(mode), data=data, population=_pop(N))

    def forbidden(update: object) -> None:
        raise AssertionError("the aggregator must never receive an individual update")

    secure.agg.on_update = forbidden  # type: ignore[method-assign]
    r_plain, r_secure = plain.run(), secure.run()
    assert r_secure.server_steps == r_plain.server_steps == 3
    np.testing.assert_array_equal(r_secure.participation, r_plain.participation)
    # Per step the decoded mean is within 2^-24 per coordinate (plus float32 rounding of the
    # sum); three SGD steps with lr 1 add at most three such errors.
    bound = r_secure.secure["decode_error_bound"]  # type: ignore[index]
    diff = np.abs(secure.agg.params.astype(np.float64) - plain.agg.params)
    assert diff.max() <= 3 * bound + 1e-6
    assert r_secure.secure["rounds"] == 3 and r_secure.secure["bytes_up_per_client"] > 0  # type: ignore[index]


def test_protocol_dropouts_are_survived_or_fail_cleanly() -> None:
    data = synthetic_fedprox(num_clients=N, size_mean=2.5, seed=4)
    sim = build_simulator(
        replace(
            _cfg("secagg", stage_dropout_prob=0.15),
            run=RunConfig(max_server_steps=4, max_sim_time_s=1e5),
        ),
        data=data,
        population=_pop(N),
    )
    r = sim.run()
    stats = r.secure
    assert stats is not None and stats["protocol_dropouts"] > 0  # type: ignore[operator]
    assert r.server_steps + stats["failed_rounds"] == stats["rounds"]  # type: ignore[operator]
    assert np.isfinite(sim.agg.params).all()


def test_secure_mode_needs_fedavg() -> None:
    with pytest.raises(ConfigError, match=r"secure_aggregation\.mode"):
        build_config(SimConfig, {"secure_aggregation": {"mode": "secagg"}})
    with pytest.raises(ConfigError, match="example_weighting"):
        build_config(
            SimConfig,
            {
                "algorithm": {"name": "fedavg", "example_weighting": "sqrt"},
                "secure_aggregation": {"mode": "secagg+"},
            },
        )
