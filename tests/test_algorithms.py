"""FedAvg, FedBuff and FedAsync as state machines, against hand-computed references."""

from __future__ import annotations

import numpy as np
import pytest

from asyncfl.algorithms import FedAsyncConfig, FedAvg, FedAvgConfig, FedBuff, FedBuffConfig
from asyncfl.algorithms.fedasync import make_fedasync
from asyncfl.core.server_opt import ServerOptimizerConfig, make_server_optimizer
from asyncfl.core.update import Update
from asyncfl.core.weights import StalenessConfig

DIM = 5


def _opt(lr: float = 1.0):  # type: ignore[no-untyped-def]
    return make_server_optimizer(ServerOptimizerConfig(name="sgd", lr=lr), DIM)


def _vec(*xs: float) -> np.ndarray:
    return np.array(xs, dtype=np.float32)


X0 = _vec(1.0, -2.0, 0.5, 3.0, 0.0)


def _upd(cid: int, base: int, n: int, delta: np.ndarray) -> Update:
    return Update(client_id=cid, base_version=base, num_examples=n, delta=delta)


def test_fedbuff_weighted_step_matches_reference() -> None:
    cfg = FedBuffConfig(
        buffer_size=3,
        staleness=StalenessConfig(kind="polynomial", a=0.5),
        example_weighting="linear",
    )
    alg = FedBuff(cfg, X0, _opt(lr=0.7))
    # Advance to version 2 with two single-update steps first (K is 3, so use a K=1 twin).
    deltas = [
        _vec(0.3, 0.1, -0.2, 1.0, 2.0),
        _vec(-1.0, 0.5, 0.25, 0.0, -3.0),
        _vec(2.0, 2.0, 2.0, 2.0, 2.0),
    ]
    ns = [5, 17, 2]
    assert alg.on_update(_upd(1, 0, ns[0], deltas[0])).step is None
    assert alg.on_update(_upd(2, 0, ns[1], deltas[1])).step is None
    out = alg.on_update(_upd(3, 0, ns[2], deltas[2]))
    assert out.step is not None and out.step.version == 1 and alg.version == 1
    ref = X0.astype(np.float64) - 0.7 * sum(
        n * d.astype(np.float64) for n, d in zip(ns, deltas, strict=True)
    ) / sum(ns)
    np.testing.assert_allclose(alg.params, ref, rtol=1e-6, atol=1e-6)
    # Now staleness: updates from version 0 at server version 1 have s = 1.
    x1 = alg.params.astype(np.float64).copy()
    stale = [(0, 4, deltas[0]), (1, 9, deltas[1]), (0, 1, deltas[2])]
    for i, (base, n, d) in enumerate(stale):
        out = alg.on_update(_upd(10 + i, base, n, d))
    assert out.step is not None
    num = sum((1 + (1 - b)) ** -0.5 * n * d.astype(np.float64) for b, n, d in stale)
    ref2 = x1 - 0.7 * num / sum(n for _, n, _ in stale)
    np.testing.assert_allclose(alg.params, ref2, rtol=1e-6, atol=1e-6)


def test_fedbuff_equal_weighting_divides_by_k() -> None:
    cfg = FedBuffConfig(buffer_size=2, staleness=StalenessConfig(kind="constant"))
    alg = FedBuff(cfg, X0, _opt())
    a, b = _vec(1, 2, 3, 4, 5), _vec(-3, 0, 1, 0, 1)
    alg.on_update(_upd(0, 0, 100, a))
    alg.on_update(_upd(1, 0, 1, b))
    np.testing.assert_allclose(alg.params, X0 - (a + b) / 2, rtol=1e-6)


def test_fedbuff_rejects_too_stale_and_leaves_state() -> None:
    cfg = FedBuffConfig(buffer_size=1, max_staleness=1)
    alg = FedBuff(cfg, X0, _opt())
    for v in range(3):
        alg.on_update(_upd(v, v, 1, _vec(0.1, 0, 0, 0, 0)))
    assert alg.version == 3
    before = alg.params.copy()
    out = alg.on_update(_upd(9, 1, 1, _vec(1, 1, 1, 1, 1)))
    assert not out.accepted and out.reason == "too_stale" and out.staleness == 2
    assert alg.version == 3 and alg.buffered == 0 and alg.rejected == {"too_stale": 1}
    np.testing.assert_array_equal(alg.params, before)


@pytest.mark.parametrize(
    ("delta", "base", "reason"),
    [
        (np.array([1, 2, 3, 4, np.nan], np.float32), 0, "not_finite"),
        (np.array([1, 2, 3, 4, np.inf], np.float32), 0, "not_finite"),
        (np.zeros(4, np.float32), 0, "bad_shape"),
        (np.zeros(5, np.float64), 0, "bad_dtype"),
        (np.zeros(5, np.float32), 7, "bad_version"),
    ],
)
def test_bad_updates_rejected_without_state_change(
    delta: np.ndarray, base: int, reason: str
) -> None:
    for alg in (
        FedBuff(FedBuffConfig(buffer_size=2), X0, _opt()),
        FedAvg(FedAvgConfig(cohort_size=2), X0, _opt()),
    ):
        alg.on_update(_upd(1, 0, 3, _vec(1, 1, 1, 1, 1)))
        out = alg.on_update(_upd(2, base, 3, delta))
        assert not out.accepted and out.reason == reason
        assert alg.buffered == 1 and alg.version == 0
        np.testing.assert_array_equal(alg.params, X0)


def test_zero_norm_update_steps_without_moving() -> None:
    alg = FedBuff(FedBuffConfig(buffer_size=1), X0, _opt())
    out = alg.on_update(_upd(0, 0, 3, np.zeros(DIM, np.float32)))
    assert out.step is not None and out.step.pseudo_grad_norm == 0.0 and alg.version == 1
    np.testing.assert_array_equal(alg.params, X0)


def test_zero_total_weight_is_no_step() -> None:
    cfg = FedBuffConfig(buffer_size=2, example_weighting="linear")
    alg = FedBuff(cfg, X0, _opt())
    alg.on_update(_upd(0, 0, 0, _vec(1, 1, 1, 1, 1)))
    out = alg.on_update(_upd(1, 0, 0, _vec(2, 2, 2, 2, 2)))
    assert out.accepted and out.step is None and out.discarded == 2
    assert alg.version == 0 and alg.buffered == 0
    np.testing.assert_array_equal(alg.params, X0)


def test_one_client_k1_applies_each_update() -> None:
    alg = FedBuff(
        FedBuffConfig(buffer_size=1, staleness=StalenessConfig(kind="constant")), X0, _opt(0.5)
    )
    d = _vec(0.2, -0.4, 1, 0, 8)
    alg.on_update(_upd(0, 0, 10, d))
    alg.on_update(_upd(0, 1, 10, d))
    np.testing.assert_allclose(alg.params, X0 - d, rtol=1e-6)


def test_fedasync_mixing_rate_and_hinge_staleness() -> None:
    cfg = FedAsyncConfig(mixing_rate=0.6, staleness=StalenessConfig(kind="hinge", a=10.0, b=1))
    alg = make_fedasync(cfg, X0, _opt())
    d = [_vec(1, 0, 0, 0, 0), _vec(0, 1, 0, 0, 0), _vec(0, 0, 1, 2, 3)]
    alg.on_update(_upd(0, 0, 5, d[0]))  # s=0 -> 0.6
    alg.on_update(_upd(1, 0, 5, d[1]))  # s=1 <= b -> 0.6
    alg.on_update(_upd(2, 0, 5, d[2]))  # s=2 -> 0.6 / (10 * 1 + 1)
    ref = X0 - 0.6 * d[0] - 0.6 * d[1] - (0.6 / 11) * d[2]
    np.testing.assert_allclose(alg.params, ref, rtol=1e-6)


def test_fedavg_closes_round_at_cohort_and_rejects_late() -> None:
    alg = FedAvg(FedAvgConfig(cohort_size=2, over_selection=0.5), X0, _opt())
    assert alg.cfg.selection_size == 3
    a, b = _vec(1, 1, 1, 1, 1), _vec(4, 0, 0, 0, -4)
    assert alg.on_update(_upd(0, 0, 1, a)).step is None
    out = alg.on_update(_upd(1, 0, 3, b))
    assert out.step is not None and alg.version == 1
    np.testing.assert_allclose(alg.params, X0 - (1 * a + 3 * b) / 4, rtol=1e-6)
    late = alg.on_update(_upd(2, 0, 5, a))
    assert not late.accepted and late.reason == "late"
    assert alg.buffered == 0


def test_fedavg_deadline_min_updates() -> None:
    alg = FedAvg(FedAvgConfig(cohort_size=3, min_updates=2), X0, _opt())
    alg.on_update(_upd(0, 0, 2, _vec(1, 1, 1, 1, 1)))
    failed = alg.on_deadline(0)
    assert failed.reason == "round_failed" and failed.discarded == 1 and alg.version == 0
    np.testing.assert_array_equal(alg.params, X0)
    alg.on_update(_upd(0, 0, 2, _vec(1, 1, 1, 1, 1)))
    alg.on_update(_upd(1, 0, 6, _vec(-1, 0, 0, 0, 0)))
    out = alg.on_deadline(0)
    assert out.step is not None and out.step.num_updates == 2 and alg.version == 1
    np.testing.assert_allclose(alg.params, X0 - _vec(-4 / 8, 2 / 8, 2 / 8, 2 / 8, 2 / 8), rtol=1e-6)
    assert alg.on_deadline(0).step is None  # stale deadline: no-op
    assert alg.on_deadline(1).reason == "round_failed"  # empty round fails, nothing to discard


def test_config_validation_reports_every_field() -> None:
    probs = FedBuffConfig(concurrency=0, buffer_size=0, max_staleness=-1).validate()
    assert {p.path for p in probs} >= {"concurrency", "buffer_size", "max_staleness"}
    probs = FedAvgConfig(
        cohort_size=2, over_selection=-1, round_deadline_s=0, min_updates=5
    ).validate()
    assert {p.path for p in probs} == {"over_selection", "round_deadline_s", "min_updates"}


def test_on_aggregate_steps_with_a_sum_computed_elsewhere() -> None:
    alg = FedAvg(FedAvgConfig(cohort_size=3), X0, _opt(0.5))
    s = _vec(3, 0, -6, 1, 2)  # sum_i n_i delta_i of 3 updates with 12 examples in all
    out = alg.on_aggregate(0, s, 12.0, 3)
    assert out.step is not None and alg.version == 1
    np.testing.assert_allclose(alg.params, X0 - 0.5 * s / 12, rtol=1e-6)
    late = alg.on_aggregate(0, s, 12.0, 3)
    assert not late.accepted and late.reason == "late" and alg.version == 1
    bad = alg.on_aggregate(1, np.full(DIM, np.nan, np.float32), 1.0, 1)
    assert not bad.accepted and bad.reason == "not_finite" and alg.version == 1


def test_custom_finalizer_receives_sum_total_and_count() -> None:
    seen: list[tuple[float, int]] = []

    def fixed_denominator(weighted_sum: np.ndarray, total: float, count: int) -> np.ndarray:
        seen.append((total, count))
        return (weighted_sum / 10.0).astype(np.float32)

    alg = FedBuff(
        FedBuffConfig(buffer_size=2, staleness=StalenessConfig(kind="constant")),
        X0,
        _opt(),
        finalize=fixed_denominator,
    )
    alg.on_update(_upd(0, 0, 3, _vec(1, 1, 1, 1, 1)))
    alg.on_update(_upd(1, 0, 5, _vec(3, 0, 0, 0, 0)))
    assert seen == [(2.0, 2)]
    np.testing.assert_allclose(alg.params, X0 - _vec(4, 1, 1, 1, 1) / 10, rtol=1e-6)
