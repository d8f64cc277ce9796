"""Clipping: bounded sensitivity, zero-norm no-op, never grows a norm (reference: plain loops)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from asyncfl.privacy import clip_update, l2_norm


def _reference_clip(values: list[float], c: float) -> tuple[list[float], float]:
    norm = math.sqrt(math.fsum(v * v for v in values))
    if norm <= c:
        return list(values), norm
    return [v * c / norm for v in values], norm


def test_zero_norm_update_is_a_noop_copy() -> None:
    delta = np.zeros(7, dtype=np.float32)
    clipped, norm = clip_update(delta, 0.5)
    assert norm == 0.0
    assert clipped.dtype == np.float32
    assert np.array_equal(clipped, delta)
    assert clipped is not delta
    assert np.isfinite(clipped).all()


def test_update_inside_the_ball_is_returned_unchanged() -> None:
    delta = np.array([0.3, -0.1, 0.05], dtype=np.float32)
    clipped, norm = clip_update(delta, 1.0)
    assert np.array_equal(clipped, delta)
    assert norm == pytest.approx(math.sqrt(0.3**2 + 0.1**2 + 0.05**2), rel=1e-6)


def test_large_update_matches_plain_python_reference_and_input_is_untouched() -> None:
    rng = np.random.default_rng(3)
    delta = (rng.standard_normal(1001) * np.linspace(0.1, 9.0, 1001)).astype(np.float32)
    before = delta.copy()
    clipped, norm = clip_update(delta, 2.5)
    ref, ref_norm = _reference_clip([float(v) for v in delta], 2.5)
    assert norm == pytest.approx(ref_norm, rel=1e-12)  # both accumulate in double
    # float32 rounding (2^-24 per entry) plus at most a few 2^-22 shrinks that pull the
    # rounded vector back inside the ball.
    np.testing.assert_allclose(clipped, np.array(ref), rtol=2**-24 + 4 * 2**-22, atol=0)
    assert l2_norm(clipped) <= 2.5
    assert np.array_equal(delta, before)


def test_norm_is_accumulated_in_float64() -> None:
    # A float32 result carries ~6e-8 relative error; float64 accumulation matches to 1e-12.
    delta = np.full(1_000_000, 1e-3, dtype=np.float32)
    exact = math.sqrt(1_000_000 * float(np.float32(1e-3)) ** 2)
    assert l2_norm(delta) == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_bad_max_norm_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="max_norm"):
        clip_update(np.ones(3, dtype=np.float32), bad)


def test_non_finite_or_wrong_dtype_delta_is_refused() -> None:
    with pytest.raises(ValueError, match="NaN"):
        clip_update(np.array([1.0, np.nan], dtype=np.float32), 1.0)
    with pytest.raises(ValueError, match="float32"):
        clip_update(np.ones(3, dtype=np.float64), 1.0)
    with pytest.raises(ValueError, match="1-D"):
        clip_update(np.ones((2, 2), dtype=np.float32), 1.0)


@settings(max_examples=200, deadline=None)
@given(
    delta=hnp.arrays(
        np.float32,
        st.integers(1, 64),
        elements=st.floats(-1e6, 1e6, width=32, allow_nan=False, allow_infinity=False),
    ),
    max_norm=st.floats(1e-3, 1e4),
)
def test_clipping_never_increases_a_norm_and_respects_the_bound(
    delta: np.ndarray, max_norm: float
) -> None:
    clipped, norm = clip_update(delta, max_norm)
    new_norm = l2_norm(clipped)
    assert norm == l2_norm(delta)
    assert new_norm <= norm
    assert new_norm <= max_norm
    if norm > max_norm:
        # Direction is kept: only the length changes.
        cos = float(np.dot(clipped.astype(np.float64), delta.astype(np.float64))) / (
            new_norm * norm
        )
        assert cos == pytest.approx(1.0, abs=1e-5)
        assert new_norm == pytest.approx(max_norm, rel=1e-5)
