"""Noise: configured std (chi-square intervals), fixed denominator, SecAgg shares."""

from __future__ import annotations

import math

import numpy as np
import pytest

from asyncfl.privacy import (
    SecureNoise,
    SeededNoise,
    distributed_noise_share,
    gaussian_noise,
    make_noise_source,
    noised_mean,
)

N = 100_000
# Interval for s^2 / sigma^2 = chi2(k) / k, k = n - 1, by the Wilson-Hilferty approximation
# (chi2/k)^(1/3) ~ N(1 - 2/(9k), 2/(9k)), accurate to ~1e-6 here; ±5 sd holds with
# probability 1 - 6e-7.
_K = N - 1
_LO, _HI = ((1 - 2 / (9 * _K) + s * 5 * math.sqrt(2 / (9 * _K))) ** 3 for s in (-1, 1))


def _assert_variance(x: np.ndarray, sigma: float) -> None:
    ratio = float(np.var(x.astype(np.float64), ddof=1)) / sigma**2
    assert _LO <= ratio <= _HI, (ratio, _LO, _HI)
    # Mean: |x̄| < 5 sigma / sqrt(n) fails with probability 6e-7.
    assert abs(float(np.mean(x))) < 5 * sigma / math.sqrt(x.shape[0])


def test_seeded_source_has_configured_std_within_chi_square_interval() -> None:
    x = gaussian_noise(N, 2.7, SeededNoise(20240611))
    assert x.dtype == np.float64
    _assert_variance(x, 2.7)


def test_seeded_source_is_reproducible_and_labelled() -> None:
    a = SeededNoise(5).standard_normal(10)
    b = SeededNoise(np.random.default_rng(5)).standard_normal(10)
    assert np.array_equal(a, b)
    assert SeededNoise(5).kind == "seeded"
    assert not np.array_equal(a, SeededNoise(6).standard_normal(10))


def test_secure_source_has_configured_std_loose_check() -> None:
    # Unseeded, so the check must hold for any draw: the sd of s^2/sigma^2 is
    # sqrt(2/n) = 0.45%, so a 3% band is 6.7 sd (false alarm ~2e-11).
    x = gaussian_noise(N, 0.35, SecureNoise())
    ratio = float(np.var(x, ddof=1)) / 0.35**2
    assert abs(ratio - 1) < 0.03
    assert abs(float(np.mean(x))) < 6 * 0.35 / math.sqrt(N)
    # Shape, not just scale: P(|Z| > 2) = 0.0455, sd sqrt(p(1-p)/n) = 6.6e-4; 6 sd band.
    tail = float(np.mean(np.abs(x) > 2 * 0.35))
    assert abs(tail - 0.0455) < 0.004
    # Box-Muller from 64-bit uniforms is truncated at sqrt(128 ln 2) = 9.42.
    assert float(np.max(np.abs(x))) <= 0.35 * math.sqrt(128 * math.log(2))


def test_secure_source_draws_differ_and_handle_odd_and_zero_sizes() -> None:
    src = SecureNoise()
    assert src.kind == "secure"
    a, b = src.standard_normal(9), src.standard_normal(9)
    assert a.shape == (9,) and not np.array_equal(a, b)
    assert src.standard_normal(0).shape == (0,)


def test_make_noise_source_refuses_seed_misuse() -> None:
    with pytest.raises(ValueError, match="no seed"):
        make_noise_source("secure", seed=1)
    with pytest.raises(ValueError, match="needs a seed"):
        make_noise_source("seeded")
    assert make_noise_source("seeded", 3).kind == "seeded"
    assert isinstance(make_noise_source("secure"), SecureNoise)


def test_noised_mean_without_noise_divides_by_the_fixed_denominator() -> None:
    clipped_sum = np.array([3.0, -1.5, 0.25, 7.0], dtype=np.float32)
    # 4 contributions arrived but the expected cohort is 10: the denominator is 10.
    out = noised_mean(
        clipped_sum, noise_multiplier=0.0, clip_norm=1.0, denominator=10.0, source=SeededNoise(0)
    )
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.array([0.3, -0.15, 0.025, 0.7], dtype=np.float32))


def test_noised_mean_matches_reference_formula_with_the_same_stream() -> None:
    rng = np.random.default_rng(9)
    clipped_sum = (rng.standard_normal(5000) * np.linspace(0.5, 4, 5000)).astype(np.float32)
    z, c, d = 1.3, 0.7, 37.0
    out = noised_mean(
        clipped_sum, noise_multiplier=z, clip_norm=c, denominator=d, source=SeededNoise(42)
    )
    ref_noise = np.random.Generator(np.random.PCG64(42)).standard_normal(5000)
    ref = ((clipped_sum.astype(np.float64) + z * c * ref_noise) / d).astype(np.float32)
    np.testing.assert_array_equal(out, ref)


def test_noised_mean_noise_has_std_z_times_c() -> None:
    clipped_sum = np.linspace(-5, 5, N).astype(np.float32)
    z, c, d = 0.9, 2.2, 13.0
    out = noised_mean(
        clipped_sum, noise_multiplier=z, clip_norm=c, denominator=d, source=SeededNoise(77)
    )
    residual = out.astype(np.float64) * d - clipped_sum.astype(np.float64)
    _assert_variance(residual, z * c)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"denominator": 0.0}, "denominator"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"clip_norm": 0.0}, "clip_norm"),
    ],
)
def test_noised_mean_refuses_bad_arguments(kwargs: dict[str, float], match: str) -> None:
    args: dict[str, float] = {"noise_multiplier": 1.0, "clip_norm": 1.0, "denominator": 5.0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        noised_mean(np.zeros(3, dtype=np.float32), source=SeededNoise(0), **args)


def test_distributed_shares_sum_to_target_variance_at_min_survivors() -> None:
    z, c, t = 1.1, 0.6, 7
    src = SeededNoise(123)
    shares = [
        distributed_noise_share(N, noise_multiplier=z, clip_norm=c, min_survivors=t, source=src)
        for _ in range(t)
    ]
    assert shares[0].dtype == np.float32
    total = np.sum(np.stack(shares).astype(np.float64), axis=0)
    _assert_variance(total, z * c)
    # One share alone carries only 1/t of the variance.
    _assert_variance(shares[0], z * c / math.sqrt(t))


def test_more_survivors_than_t_only_adds_noise() -> None:
    z, c, t, n = 1.1, 0.6, 4, 10
    src = SeededNoise(321)
    total = sum(
        distributed_noise_share(
            N, noise_multiplier=z, clip_norm=c, min_survivors=t, source=src
        ).astype(np.float64)
        for _ in range(n)
    )
    assert isinstance(total, np.ndarray)
    _assert_variance(total, z * c * math.sqrt(n / t))


def test_distributed_share_refuses_bad_min_survivors() -> None:
    with pytest.raises(ValueError, match="min_survivors"):
        distributed_noise_share(
            3, noise_multiplier=1.0, clip_norm=1.0, min_survivors=0, source=SeededNoise(0)
        )
