"""Adaptive clipping (Andrew et al. 2021): noise split, geometric update, quantile tracking."""

from __future__ import annotations

import math
from statistics import NormalDist

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp

from asyncfl.errors import ConfigError
from asyncfl.privacy import (
    AdaptiveClipConfig,
    AdaptiveClipState,
    SeededNoise,
    centred_unclipped_bit,
    next_clip_norm,
    noised_unclipped_fraction,
    total_noise_multiplier,
    update_noise_multiplier,
)


@pytest.mark.parametrize("z,sigma_b", [(1.0, 5.0), (0.8, 0.5), (2.3, 1.4)])
def test_update_and_count_noise_compose_to_the_stated_total(z: float, sigma_b: float) -> None:
    z_delta = update_noise_multiplier(z, sigma_b)
    assert z_delta > z
    # Reference: dp-accounting composes the update's Gaussian (z_Δ) with the centred
    # count's Gaussian (sensitivity 1/2, std σ_b => multiplier 2σ_b) ...
    both = rdp.RdpAccountant()
    both.compose(dp_accounting.GaussianDpEvent(z_delta), 30)
    both.compose(dp_accounting.GaussianDpEvent(2 * sigma_b), 30)
    # ... and that must cost what one Gaussian with the total z costs.
    single = rdp.RdpAccountant()
    single.compose(dp_accounting.GaussianDpEvent(z), 30)
    assert both.get_epsilon(1e-5) == pytest.approx(single.get_epsilon(1e-5), rel=1e-9)
    assert total_noise_multiplier(z_delta, sigma_b) == pytest.approx(z, rel=1e-12)


def test_update_noise_multiplier_formula_and_limits() -> None:
    assert update_noise_multiplier(1.2, 3.0) == pytest.approx((1.2**-2 - 6.0**-2) ** -0.5)
    assert update_noise_multiplier(0.0, 0.0) == 0.0
    with pytest.raises(ValueError, match="must exceed noise_multiplier/2"):
        update_noise_multiplier(1.0, 0.5)  # 2σ_b == z: the count would use the whole budget


def test_next_clip_norm_is_the_geometric_update() -> None:
    cfg = AdaptiveClipConfig(initial_clip_norm=1.7, target_quantile=0.3, learning_rate=0.15)
    assert next_clip_norm(1.7, 0.9, cfg) == pytest.approx(1.7 * math.exp(-0.15 * 0.6))
    assert next_clip_norm(1.7, 0.1, cfg) > 1.7  # too many clipped: grow
    assert next_clip_norm(1.7, 0.3, cfg) == 1.7


def test_noised_fraction_uses_centred_bits_fixed_denominator_and_sigma_b() -> None:
    norms = [0.2, 3.0, 0.9, 1.4, 5.5, 0.1, 1.0]
    bits = sum(centred_unclipped_bit(n, 1.0) for n in norms)  # 4 unclipped, 3 clipped
    assert bits == pytest.approx(4 * 0.5 - 3 * 0.5)
    quiet = AdaptiveClipConfig(initial_clip_norm=1.0, clipped_count_stddev=0.0, denominator=10.0)
    # 7 of an expected 10 arrived; the estimate keeps the fixed denominator.
    assert noised_unclipped_fraction(bits, quiet, SeededNoise(0)) == pytest.approx(0.5 / 10 + 0.5)
    noisy = AdaptiveClipConfig(initial_clip_norm=1.0, clipped_count_stddev=2.5, denominator=10.0)
    got = noised_unclipped_fraction(bits, noisy, SeededNoise(8))
    draw = float(np.random.Generator(np.random.PCG64(8)).standard_normal(1)[0])
    assert got == pytest.approx((0.5 + 2.5 * draw) / 10 + 0.5, rel=1e-12)


def _run_lognormal(gamma: float, rounds: int, seed: int) -> tuple[AdaptiveClipState, list[float]]:
    # m = 100 clients per round, σ_b = m / 20 (the paper's default), η = 0.2, start 10x low.
    cfg = AdaptiveClipConfig(
        initial_clip_norm=0.2,
        target_quantile=gamma,
        learning_rate=0.2,
        clipped_count_stddev=5.0,
        denominator=100.0,
    )
    state, rng, noise = AdaptiveClipState(cfg), np.random.default_rng(seed), SeededNoise(seed + 1)
    log_c: list[float] = []
    for _ in range(rounds):
        norms = np.exp(0.7 + 0.6 * rng.standard_normal(100))
        state.step(sum(centred_unclipped_bit(float(n), state.clip_norm) for n in norms), noise)
        log_c.append(math.log(state.clip_norm))
    return state, log_c


@pytest.mark.parametrize("gamma", [0.5, 0.8])
def test_converges_to_target_quantile_of_lognormal_norms(gamma: float) -> None:
    _, log_c = _run_lognormal(gamma, 400, seed=17)
    target = 0.7 + 0.6 * NormalDist().inv_cdf(gamma)  # log of the true γ-quantile
    # Near the quantile log C is AR(1): coefficient 1 - η f ≈ 0.87 (f = density of log
    # norms there, ≤ 0.665), step noise η·sd(b̄) ≈ 0.2·0.07, so stationary sd ≈ 0.03 and
    # the mean of 100 correlated rounds has sd ≈ 0.011; 0.06 is > 5 sd (6% in C).
    assert abs(float(np.mean(log_c[-100:])) - target) < 0.06
    # Same claim in the quantity that matters: the fraction of fresh norms left unclipped.
    c = math.exp(float(np.mean(log_c[-100:])))
    fresh = np.exp(0.7 + 0.6 * np.random.default_rng(99).standard_normal(20000))
    assert abs(float(np.mean(fresh <= c)) - gamma) < 0.03


def test_state_dict_resumes_the_same_trajectory() -> None:
    cfg = AdaptiveClipConfig(
        initial_clip_norm=0.5,
        target_quantile=0.4,
        learning_rate=0.3,
        clipped_count_stddev=1.5,
        denominator=20.0,
    )
    sums = [3.5, -2.0, 0.5, 7.0, -9.5, 1.0]
    straight = AdaptiveClipState(cfg)
    noise = SeededNoise(4)
    for s in sums:
        straight.step(s, noise)
    first = AdaptiveClipState(cfg)
    noise2 = SeededNoise(4)
    for s in sums[:3]:
        first.step(s, noise2)
    resumed = AdaptiveClipState(cfg)
    resumed.load_state_dict(first.state_dict())
    for s in sums[3:]:
        resumed.step(s, noise2)
    assert resumed.clip_norm == straight.clip_norm
    assert resumed.steps == straight.steps == 6


def test_bad_state_dict_is_refused_and_changes_nothing() -> None:
    state = AdaptiveClipState(AdaptiveClipConfig(initial_clip_norm=0.5))
    with pytest.raises(ConfigError) as err:
        state.load_state_dict({"clip_norm": -1.0, "steps": -2})
    assert {p.path for p in err.value.problems} == {"clip_norm", "steps"}
    assert state.clip_norm == 0.5 and state.steps == 0


def test_adaptive_config_reports_every_bad_field() -> None:
    cfg = AdaptiveClipConfig(
        initial_clip_norm=0.0,
        target_quantile=1.0,
        learning_rate=-0.1,
        clipped_count_stddev=-1.0,
        denominator=0.0,
    )
    assert {p.path for p in cfg.validate()} == {
        "initial_clip_norm",
        "target_quantile",
        "learning_rate",
        "clipped_count_stddev",
        "denominator",
    }
    with pytest.raises(ConfigError):
        AdaptiveClipState(cfg)
