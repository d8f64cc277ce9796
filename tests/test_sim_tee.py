"""FedBuff and FedAsync through the TEE secure buffer in the simulator."""

from __future__ import annotations

from dataclasses import replace

import dp_accounting
import numpy as np
import pytest

from asyncfl.algorithms import FedAsyncConfig, FedAvgConfig, FedBuffConfig
from asyncfl.core.weights import StalenessConfig
from asyncfl.data.synthetic import synthetic_fedprox
from asyncfl.sim.config import RunConfig, SimConfig
from asyncfl.sim.devices import DAY_S, DevicePopulation
from asyncfl.sim.dp import DPSection
from asyncfl.sim.factory import build_simulator
from asyncfl.sim.secure_rounds import SecureAggregationConfig, SecureMode, TeeBackendKind
from asyncfl.training.config import ClientConfig

N = 20
DP_N = 30


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


def _cfg(
    alg: FedBuffConfig | FedAsyncConfig, mode: SecureMode, backend: TeeBackendKind = "inprocess"
) -> SimConfig:
    return SimConfig(
        seed=1,
        algorithm=alg,
        client=ClientConfig(batch_size=8, lr=0.05),
        run=RunConfig(max_server_steps=4, eval_every=4),
        secure_aggregation=SecureAggregationConfig(
            mode=mode,
            tee_backend=backend,
        ),
    )


@pytest.mark.parametrize(
    ("alg", "backend"),
    [
        (FedBuffConfig(concurrency=8, buffer_size=4, example_weighting="linear"), "inprocess"),
        (FedBuffConfig(concurrency=6, buffer_size=3), "subprocess"),
        (FedAsyncConfig(concurrency=5, mixing_rate=0.6), "inprocess"),
    ],
)
def test_tee_trajectory_matches_plain_within_bound(
    alg: FedBuffConfig | FedAsyncConfig, backend: TeeBackendKind
) -> None:
    data = synthetic_fedprox(num_clients=N, size_mean=2.5, seed=4)
    plain = build_simulator(_cfg(alg, "none"), data=data, population=_pop(N))
    secure = build_simulator(_cfg(alg, "tee", backend), data=data, population=_pop(N))

    def forbidden(update: object) -> None:
        raise AssertionError("the aggregator must never receive an individual update")

    secure.agg.on_update = forbidden  # type: ignore[method-assign, assignment]
    r_plain, r_secure = plain.run(), secure.run()
    assert r_secure.server_steps == r_plain.server_steps == 4
    assert r_secure.rejected == r_plain.rejected == {}
    np.testing.assert_array_equal(r_secure.participation, r_plain.participation)
    assert r_secure.staleness_counts == r_plain.staleness_counts
    stats = r_secure.secure
    assert stats is not None and stats["releases"] == 4 and stats["enclave_restarts"] == 0
    # Per step |g - g_plain| <= bound (fixed point + weight quantisation, server SGD lr 1).
    # Later clients train from slightly different models; with lr 0.05 and a few local steps
    # their deltas move by far less than the parameter difference, hence the factor 2.
    bound = stats["decode_error_bound"]
    diff = np.abs(secure.agg.params.astype(np.float64) - plain.agg.params)
    assert 0 < diff.max() <= 2 * 4 * bound + 1e-6  # type: ignore[operator]


def test_config_refuses_tee_with_fedavg_and_non_integer_weights() -> None:
    bad = [
        SimConfig(algorithm=FedAvgConfig(), secure_aggregation=SecureAggregationConfig("tee")),
        SimConfig(
            algorithm=FedBuffConfig(example_weighting="sqrt"),
            secure_aggregation=SecureAggregationConfig("tee"),
        ),
        SimConfig(
            algorithm=FedBuffConfig(),
            secure_aggregation=SecureAggregationConfig("tee", weight_bits=30),
        ),
    ]
    paths = [[p.path for p in c.validate() + c.secure_aggregation.validate()] for c in bad]
    assert "secure_aggregation.mode" in paths[0]
    assert "algorithm.example_weighting" in paths[1]
    assert "weight_bits" in paths[2]
    ok = SimConfig(algorithm=FedAsyncConfig(), secure_aggregation=SecureAggregationConfig("tee"))
    assert ok.validate() == []


def _dp_cfg(backend: TeeBackendKind = "inprocess", **dp: object) -> SimConfig:
    return SimConfig(
        seed=2,
        algorithm=FedBuffConfig(
            concurrency=6, buffer_size=3, staleness=StalenessConfig(kind="constant")
        ),
        client=ClientConfig(batch_size=8, lr=0.05),
        run=RunConfig(max_server_steps=4, eval_every=4),
        secure_aggregation=SecureAggregationConfig(mode="tee", tee_backend=backend),
        privacy=DPSection(enabled=True, noise_source="seeded", **dp),  # type: ignore[arg-type]
    )


def test_tee_dp_epsilon_matches_dp_accounting_and_backends_agree() -> None:
    data = synthetic_fedprox(num_clients=DP_N, size_mean=2.5, seed=5)
    runs = {}
    for backend in ("inprocess", "subprocess"):
        sim = build_simulator(
            _dp_cfg(backend, noise_multiplier=1.3), data=data, population=_pop(DP_N)
        )
        runs[backend] = (sim.run(), sim.agg.params.copy())
    r, params = runs["inprocess"]
    assert r.server_steps == 4 and r.privacy is not None and r.privacy["steps"] == 4
    assert r.privacy["noise_added_in"] == "enclave" and r.secure is not None
    acc = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(3 / DP_N, dp_accounting.GaussianDpEvent(1.3))
    acc.compose(event, 4)
    assert r.privacy["epsilon"] == pytest.approx(acc.get_epsilon(1 / (10 * DP_N)), rel=1e-9)
    # Seeded (research) noise is drawn in the enclave from the same seed in either backend.
    np.testing.assert_array_equal(runs["subprocess"][1], params)


def test_tee_dp_budget_stops_before_exceeding() -> None:
    data = synthetic_fedprox(num_clients=DP_N, size_mean=2.5, seed=5)
    cfg = replace(
        _dp_cfg(noise_multiplier=1.0, epsilon_budget=2.0), run=RunConfig(max_server_steps=500)
    )
    sim = build_simulator(cfg, data=data, population=_pop(DP_N))
    r = sim.run()
    assert r.stop_reason == "privacy_budget" and r.privacy is not None
    assert 0 < r.privacy["epsilon"] <= 2.0  # type: ignore[operator]
    assert r.privacy["steps"] == r.server_steps and r.secure is not None
    assert r.secure["releases"] == r.server_steps
    acc = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(3 / DP_N, dp_accounting.GaussianDpEvent(1.0))
    acc.compose(event, r.server_steps + 1)
    assert acc.get_epsilon(1 / (10 * DP_N)) > 2.0  # one more release would have exceeded it


def test_config_accepts_tee_with_fixed_clipping_dp_only() -> None:
    assert _dp_cfg().validate() == []
    adaptive = _dp_cfg(clipping="adaptive")
    assert [p.path for p in adaptive.validate()] == ["privacy.clipping"]
    # SecAgg takes DP as distributed noise: accepted once the fixed-point range holds the
    # clients' noise shares.
    secagg = replace(
        _dp_cfg(),
        algorithm=FedAvgConfig(example_weighting="equal"),
        secure_aggregation=SecureAggregationConfig(mode="secagg", clip=100.0),
    )
    assert secagg.validate() == []


@pytest.mark.parametrize(("fit", "want"), [(True, (32, 20, 9)), (False, (62, 24, 12))])
def test_tee_fits_the_32_bit_ring_unless_told_not_to(fit: bool, want: tuple[int, ...]) -> None:
    """K = 3 at f = 24, S = 12 needs 38 bits; by default the simulator lowers the precision
    until 3 * 2^(f+S) <= 2^31 - 1, i.e. f + S = 29: (20, 9)."""
    alg = FedBuffConfig(concurrency=6, buffer_size=3)
    data = synthetic_fedprox(num_clients=N, size_mean=2.5, seed=4)
    cfg = _cfg(alg, "tee")
    cfg = replace(cfg, secure_aggregation=replace(cfg.secure_aggregation, tee_fit_ring32=fit))
    stats = build_simulator(cfg, data=data, population=_pop(N)).run().secure
    assert stats is not None
    assert (stats["ring_bits"], stats["frac_bits"], stats["weight_bits"]) == want
