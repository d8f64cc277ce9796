"""FedBuff and FedAsync through LightSecAgg (no TEE) in the simulator."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from asyncfl.algorithms import FedAsyncConfig, FedAvgConfig, FedBuffConfig
from asyncfl.algorithms.lightsecagg_fedbuff import LightSecAggFedBuff
from asyncfl.data.synthetic import synthetic_fedprox
from asyncfl.errors import ConfigError
from asyncfl.secure.lightsecagg import MaskedUpload
from asyncfl.sim.config import RunConfig, SimConfig
from asyncfl.sim.devices import DAY_S, DevicePopulation
from asyncfl.sim.dp import DPSection
from asyncfl.sim.factory import build_simulator
from asyncfl.sim.secure_rounds import SecureAggregationConfig, SecureMode
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


def _sec(mode: SecureMode, dropout: float = 0.0) -> SecureAggregationConfig:
    return SecureAggregationConfig(
        mode=mode, frac_bits=16, weight_bits=6, stage_dropout_prob=dropout
    )


def _cfg(alg: FedBuffConfig | FedAsyncConfig, mode: SecureMode, dropout: float = 0.0) -> SimConfig:
    return SimConfig(
        seed=1,
        algorithm=alg,
        client=ClientConfig(batch_size=8, lr=0.05),
        run=RunConfig(max_server_steps=4, eval_every=4),
        secure_aggregation=_sec(mode, dropout),
    )


@pytest.mark.parametrize(
    "alg",
    [
        FedBuffConfig(concurrency=8, buffer_size=4, example_weighting="linear"),
        FedAsyncConfig(concurrency=5, mixing_rate=0.6),
    ],
)
def test_lightsecagg_trajectory_matches_plain_within_bound(
    alg: FedBuffConfig | FedAsyncConfig,
) -> None:
    data = synthetic_fedprox(num_clients=N, size_mean=2.5, seed=4)
    plain = build_simulator(_cfg(alg, "none"), data=data, population=_pop(N))
    secure = build_simulator(_cfg(alg, "lightsecagg"), data=data, population=_pop(N))
    agg = secure.agg
    assert isinstance(agg, LightSecAggFedBuff)

    def forbidden(update: object) -> None:
        raise AssertionError("the aggregator must never receive an individual update")

    received: list[object] = []
    masked_in = agg.on_masked_update

    def spy(up: MaskedUpload) -> object:
        received.append(up)
        return masked_in(up)

    agg.on_update = forbidden  # type: ignore[method-assign, assignment]
    agg.on_masked_update = spy  # type: ignore[method-assign, assignment]
    r_plain, r_secure = plain.run(), secure.run()
    assert r_secure.server_steps == r_plain.server_steps == 4
    assert r_secure.rejected == r_plain.rejected == {}
    np.testing.assert_array_equal(r_secure.participation, r_plain.participation)
    assert r_secure.staleness_counts == r_plain.staleness_counts
    assert received and all(isinstance(u, MaskedUpload) for u in received)
    stats = r_secure.secure
    assert stats is not None and stats["mode"] == "lightsecagg" and stats["releases"] == 4
    assert (stats["users"], stats["privacy_threshold"], stats["target_survivors"]) == (N, 5, 10)
    # Per step |g - g_plain| <= bound (fixed point + weight quantisation, server SGD lr 1);
    # factor 2 for later clients training from slightly different models (as for the TEE).
    bound = stats["decode_error_bound"]
    diff = np.abs(agg.params.astype(np.float64) - plain.agg.params)
    assert 0 < diff.max() <= 2 * 4 * bound + 1e-6  # type: ignore[operator]


def test_lightsecagg_survives_dropouts_and_discards_failed_buffers() -> None:
    """With each user failing to answer w.p. 0.45, some buffers get < U = 10 of 20 answers
    and are discarded whole; the others step."""
    data = synthetic_fedprox(num_clients=N, size_mean=2.5, seed=4)
    alg = FedBuffConfig(concurrency=6, buffer_size=3)
    sim = build_simulator(_cfg(alg, "lightsecagg", dropout=0.45), data=data, population=_pop(N))
    r = sim.run()
    stats = r.secure
    assert stats is not None and r.server_steps == 4 == stats["releases"]
    assert stats["failed_unmaskings"] >= 1  # type: ignore[operator]
    assert stats["protocol_dropouts"] > 0  # type: ignore[operator]
    assert np.isfinite(sim.agg.params).all()


def test_config_refuses_lightsecagg_misuse() -> None:
    ok = _cfg(FedBuffConfig(buffer_size=10), "lightsecagg")
    assert ok.validate() == [] and ok.secure_aggregation.validate() == []
    fedavg = replace(ok, algorithm=FedAvgConfig())
    assert [p.path for p in fedavg.validate()] == ["secure_aggregation.mode"]
    wide = replace(ok, secure_aggregation=SecureAggregationConfig(mode="lightsecagg"))
    assert [p.path for p in wide.validate()] == ["secure_aggregation.frac_bits"]
    dp = replace(ok, privacy=DPSection(enabled=True))
    assert "privacy.enabled" in [p.path for p in dp.validate()]
    bad = replace(_sec("lightsecagg"), lightsecagg_privacy_fraction=0.6)
    assert [p.path for p in bad.validate()] == ["lightsecagg_survivor_fraction"]


def test_factory_checks_headroom_with_the_largest_example_weight() -> None:
    data = synthetic_fedprox(num_clients=N, size_mean=2.5, seed=4)
    alg = FedBuffConfig(buffer_size=10, example_weighting="linear")
    cfg = replace(
        _cfg(alg, "lightsecagg"),
        secure_aggregation=SecureAggregationConfig(mode="lightsecagg", frac_bits=18, weight_bits=6),
    )
    assert cfg.validate() == []  # example weight 1 fits; the data's largest does not
    with pytest.raises(ConfigError, match="frac_bits"):
        build_simulator(cfg, data=data, population=_pop(N))
