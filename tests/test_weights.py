"""Staleness and example weights vs hand values; WeightedSum vs a float64 numpy reference."""

from __future__ import annotations

import itertools
import math
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncfl.core.weights import StalenessConfig, WeightedSum, example_weight

U = 2.0**-24  # float32 unit roundoff
TINY = 2.0**-149  # smallest float32 subnormal: the absolute error of a rounding that underflows


def gamma(k: int) -> float:
    return k * U / (1 - k * U)


# ---------------------------------------------------------------- staleness


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        (StalenessConfig("constant"), {0: 1.0, 1: 1.0, 3: 1.0, 10: 1.0}),
        (
            StalenessConfig("polynomial", a=0.5),
            {0: 1.0, 1: 1 / math.sqrt(2), 3: 0.5, 10: 1 / math.sqrt(11)},
        ),
        (StalenessConfig("polynomial", a=2.0), {0: 1.0, 1: 0.25, 3: 1 / 16, 10: 1 / 121}),
        # FedAsync hinge a=10, b=4: flat up to b, then 1/(10(s-4)+1).
        (
            StalenessConfig("hinge", a=10.0, b=4),
            {0: 1.0, 1: 1.0, 3: 1.0, 4: 1.0, 5: 1 / 11, 10: 1 / 61},
        ),
        (StalenessConfig("hinge", a=3.0, b=0), {0: 1.0, 1: 1 / 4, 3: 1 / 10, 10: 1 / 31}),
    ],
    ids=repr,
)
def test_staleness_hand_values(cfg: StalenessConfig, expected: dict[int, float]) -> None:
    assert cfg.validate() == []
    for s, w in expected.items():
        assert cfg.weight(s) == pytest.approx(w, rel=1e-15)
        assert isinstance(cfg.weight(s), float)


def test_staleness_defaults_are_explicit() -> None:
    # Field defaults are polynomial's; a bare hinge keeps a = 0.5 as its slope.
    assert StalenessConfig() == StalenessConfig("polynomial", a=0.5, b=4)
    assert StalenessConfig("hinge").weight(5) == pytest.approx(1 / 1.5)
    assert StalenessConfig.paper_default("hinge") == StalenessConfig("hinge", a=10.0, b=4)
    assert StalenessConfig.paper_default("polynomial") == StalenessConfig("polynomial", a=0.5)
    assert StalenessConfig.paper_default("constant").weight(7) == 1.0
    assert StalenessConfig.paper_default("hinge").weight(5) == pytest.approx(1 / 11)


def test_staleness_rejects_bad_s() -> None:
    cfg = StalenessConfig()
    with pytest.raises(ValueError, match="-1"):
        cfg.weight(-1)
    with pytest.raises(TypeError):
        cfg.weight(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        cfg.weight(True)
    assert cfg.weight(np.int64(3)) == 0.5  # type: ignore[arg-type]


def test_staleness_weights_decrease_with_s() -> None:
    for cfg in (StalenessConfig("polynomial", a=0.7), StalenessConfig.paper_default("hinge")):
        ws = [cfg.weight(s) for s in range(30)]
        assert all(0 < b <= a <= 1 for a, b in itertools.pairwise(ws))


def test_staleness_config_reports_every_problem() -> None:
    cfg = StalenessConfig(kind="exp", a=-1.0, b=-2)  # type: ignore[arg-type]
    problems = cfg.validate(path="fedbuff.staleness")
    assert [p.path for p in problems] == [
        "fedbuff.staleness.kind",
        "fedbuff.staleness.a",
        "fedbuff.staleness.b",
    ]
    assert "got 'exp'" in str(problems[0])
    for bad in (
        StalenessConfig(a=float("nan")),
        StalenessConfig(a=float("inf")),
        StalenessConfig("hinge", a=True),
    ):
        assert [p.path for p in bad.validate("staleness")] == ["staleness.a"]
    assert [p.path for p in StalenessConfig(b=2.5).validate("staleness")] == ["staleness.b"]  # type: ignore[arg-type]
    assert StalenessConfig("constant", a=0.0, b=0).validate() == []


# ---------------------------------------------------------------- example weights


def test_example_weights_hand_values() -> None:
    table = {
        "equal": {0: 1.0, 1: 1.0, 4: 1.0, 100: 1.0},
        "linear": {0: 0.0, 1: 1.0, 4: 4.0, 100: 100.0},
        "sqrt": {0: 0.0, 1: 1.0, 4: 2.0, 100: 10.0},
        "log": {0: 0.0, 1: math.log(2), 4: math.log(5), 100: math.log(101)},
    }
    for kind, values in table.items():
        for n, w in values.items():
            assert example_weight(kind, n) == pytest.approx(w, rel=1e-15), (kind, n)  # type: ignore[arg-type]


def test_example_weight_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="-3"):
        example_weight("linear", -3)
    with pytest.raises(ValueError, match="'median'"):
        example_weight("median", 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        example_weight("sqrt", 2.0)  # type: ignore[arg-type]


# ---------------------------------------------------------------- WeightedSum


def _bound(weights: list[float], deltas: list[np.ndarray]) -> np.ndarray:
    """Per-coordinate error bound of the float32 sum (see WeightedSum's docstring)."""
    n = len(weights)
    mag = np.zeros(deltas[0].shape, dtype=np.float64)
    for w, d in zip(weights, deltas, strict=True):
        mag += abs(w) * np.abs(d.astype(np.float64))
    return gamma(n + 1) * mag + 2 * (n + 1) * TINY


def _asymmetric(dim: int, seed: int) -> tuple[list[float], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    weights = [0.37, 5.0, 1.0, 0.0, 123.25, 1e-3]
    scales = [1.0, 1e-2, 30.0, 7.0, 0.5, 1e3]
    deltas = [(rng.standard_normal(dim) * s).astype(np.float32) for s in scales]
    return weights, deltas


@pytest.mark.parametrize("dim", [7, 150_001])  # the second spans three chunks, the last partial
def test_weighted_sum_matches_float64_reference(dim: int) -> None:
    weights, deltas = _asymmetric(dim, seed=dim)
    acc = WeightedSum(dim)
    for w, d in zip(weights, deltas, strict=True):
        acc.add(d, w)
    ref = sum(w * d.astype(np.float64) for w, d in zip(weights, deltas, strict=True))
    assert acc.count == len(weights)
    assert acc.total_weight == sum(weights)
    assert acc.sum.dtype == np.float32
    assert np.all(np.abs(acc.sum - ref) <= _bound(weights, deltas))
    # Weighted mean: two more roundings (the float32 denominator and the division).
    mean = acc.mean(acc.total_weight)
    ref_mean = ref / sum(weights)
    tol = (_bound(weights, deltas) / sum(weights)) + gamma(2) * np.abs(ref_mean)
    assert np.all(np.abs(mean - ref_mean) <= tol)
    # The weights matter: the unweighted mean is far from the weighted one.
    assert np.max(np.abs(mean - np.mean(deltas, axis=0))) > 1.0


def test_weighted_sum_is_deterministic_in_arrival_order() -> None:
    weights, deltas = _asymmetric(1000, seed=5)
    a, b = WeightedSum(1000), WeightedSum(1000)
    for w, d in zip(weights, deltas, strict=True):
        a.add(d, w)
        b.add(d.copy(), w)
    np.testing.assert_array_equal(a.sum, b.sum)


def test_empty_sum_has_no_mean() -> None:
    acc = WeightedSum(3)
    assert acc.count == 0 and acc.total_weight == 0.0
    np.testing.assert_array_equal(acc.sum, np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError, match="> 0"):
        acc.mean(acc.total_weight)


def test_zero_weight_is_counted_but_contributes_nothing() -> None:
    acc = WeightedSum(3)
    acc.add(np.array([1.0, -2.0, 3.0], dtype=np.float32), 0.0)
    assert acc.count == 1 and acc.total_weight == 0.0
    np.testing.assert_array_equal(acc.sum, np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError, match="zero-weight"):
        acc.mean(acc.total_weight)  # zero total weight never silently gives zeros
    np.testing.assert_array_equal(acc.mean(acc.count), np.zeros(3, dtype=np.float32))


def test_zero_norm_delta_and_single_update() -> None:
    acc = WeightedSum(4)
    acc.add(np.zeros(4, dtype=np.float32), 2.5)
    assert acc.count == 1 and acc.total_weight == 2.5
    np.testing.assert_array_equal(acc.mean(2.5), np.zeros(4, dtype=np.float32))
    acc.reset()
    d = np.array([0.1, -3.0, 7e-3, 2e4], dtype=np.float32)
    acc.add(d, 0.3)
    # fl(fl(fl(0.3)·d)/fl(0.3)): three roundings of d.
    np.testing.assert_allclose(acc.mean(acc.total_weight), d, rtol=gamma(3), atol=0)


@pytest.mark.parametrize("den", [0.0, -1.0, float("nan"), float("inf"), 1e-50, 1e39])
def test_mean_rejects_bad_denominator(den: float) -> None:
    acc = WeightedSum(2)
    acc.add(np.ones(2, dtype=np.float32), 1.0)
    with pytest.raises(ValueError, match="denominator"):
        acc.mean(den)


def test_mean_refuses_overflow_and_returns_a_copy() -> None:
    acc = WeightedSum(2)
    acc.add(np.array([3e38, 1.0], dtype=np.float32), 1.0)
    with pytest.raises(ValueError, match="overflows"):
        acc.mean(0.5)
    mean = acc.mean(2.0)
    mean[:] = 0.0
    assert acc.sum[0] == np.float32(3e38)


def test_add_rejects_bad_input_without_change() -> None:
    acc = WeightedSum(3)
    good = np.array([1.0, 2.0, -4.0], dtype=np.float32)
    acc.add(good, 0.5)
    before = acc.sum.copy()
    nan = good.copy()
    nan[1] = np.nan
    inf = good.copy()
    inf[2] = np.inf
    cases: list[tuple[object, object, str]] = [
        (good[:2], 1.0, r"shape \(3,\).*\(2,\)"),
        (good.astype(np.float64), 1.0, "float64"),
        (good.reshape(3, 1), 1.0, "shape"),
        ([1.0, 2.0, 3.0], 1.0, "list"),
        (nan, 1.0, "NaN"),
        (inf, 1.0, "NaN or Inf"),
        (good, -0.1, "-0.1"),
        (good, float("nan"), "nan"),
        (good, float("inf"), "inf"),
        (good, True, "True"),
        (good, "2", "'2'"),
        (good, 1e38, "overflows"),  # 1e38 · 4 > FLT_MAX
    ]
    for delta, weight, match in cases:
        with pytest.raises(ValueError, match=match):
            acc.add(delta, weight)  # type: ignore[arg-type]
    assert acc.count == 1 and acc.total_weight == 0.5
    np.testing.assert_array_equal(acc.sum, before)
    acc.add(good, np.float64(2.0))  # numpy scalars are fine
    assert acc.total_weight == 2.5


def test_reset_reuses_the_buffer_and_sum_is_read_only() -> None:
    acc = WeightedSum(5)
    view = acc.sum
    with pytest.raises(ValueError):
        view[0] = 1.0
    acc.add(np.arange(5, dtype=np.float32), 3.0)
    np.testing.assert_array_equal(view, 3.0 * np.arange(5))  # a live view
    acc.reset()
    assert np.shares_memory(acc.sum, view)
    assert acc.count == 0 and acc.total_weight == 0.0
    np.testing.assert_array_equal(acc.sum, np.zeros(5, dtype=np.float32))
    acc.add(np.ones(5, dtype=np.float32), 1.0)
    np.testing.assert_array_equal(acc.sum, np.ones(5, dtype=np.float32))
    with pytest.raises(ValueError, match="dim"):
        WeightedSum(0)


def test_add_allocates_no_model_sized_temporary() -> None:
    # One float32 temporary for weight·delta would be 4 MB here; the chunk scratch is 256 KiB
    # and allocated up front, so adding must stay far below one model-sized vector.
    dim = 1_000_000
    acc = WeightedSum(dim)
    deltas = [np.full(dim, i + 1, dtype=np.float32) for i in range(3)]
    weights = [0.25, 1.0, 2.25]  # 1.0 takes the no-multiply path
    tracemalloc.start()
    try:
        for w, d in zip(weights, deltas, strict=True):
            acc.add(d, w)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, peak
    np.testing.assert_allclose(acc.sum[:3], 0.25 + 2 * 1.0 + 3 * 2.25, rtol=gamma(4))


_weights = st.one_of(st.just(0.0), st.floats(1e-3, 1e3), st.sampled_from([1.0, 2.0]))
_values = st.floats(-1e3, 1e3, width=32, allow_subnormal=False)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    st.integers(1, 9).flatmap(
        lambda dim: st.lists(
            st.tuples(_weights, st.lists(_values, min_size=dim, max_size=dim)),
            min_size=1,
            max_size=12,
        )
    )
)
def test_weighted_sum_property_within_float32_rounding_bound(
    items: list[tuple[float, list[float]]],
) -> None:
    weights = [w for w, _ in items]
    deltas = [np.array(d, dtype=np.float32) for _, d in items]
    acc = WeightedSum(len(deltas[0]))
    for w, d in zip(weights, deltas, strict=True):
        acc.add(d, w)
    ref = sum(w * d.astype(np.float64) for w, d in zip(weights, deltas, strict=True))
    assert acc.count == len(items)
    assert acc.total_weight == pytest.approx(math.fsum(weights), rel=len(items) * 2**-52)
    assert np.all(np.abs(acc.sum - ref) <= _bound(weights, deltas))
