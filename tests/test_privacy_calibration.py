"""Noise calibration: the returned z meets the target and is tight (checked with dp-accounting)."""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp

from asyncfl.privacy import calibrate_noise_multiplier

TOL = 1e-3


def _rdp_eps(z: float, q: float, steps: int, delta: float) -> float:
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    return float(acc.get_epsilon(delta))


@pytest.mark.parametrize("target", [1.0, 2.0, 4.0, 8.0])
def test_calibrated_multiplier_meets_target_and_is_tight(target: float) -> None:
    z = calibrate_noise_multiplier(target, 1e-5, 300, 0.02, tolerance=TOL)
    assert _rdp_eps(z, 0.02, 300, 1e-5) <= target
    # Brent's tolerance is in z: anything 2·tol smaller must overshoot the target.
    assert _rdp_eps(z - 2 * TOL, 0.02, 300, 1e-5) > target


def test_larger_epsilon_needs_less_noise() -> None:
    zs = [calibrate_noise_multiplier(e, 1e-5, 200, 0.05) for e in (1.0, 4.0)]
    assert zs[0] > zs[1] > 0


def test_pld_variant_meets_target() -> None:
    z = calibrate_noise_multiplier(
        3.0, 1e-5, 5, 1.0, sampling="none", accountant="pld", tolerance=0.02
    )
    acc = pld.PLDAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(z), 5)
    assert acc.get_epsilon(1e-5) <= 3.0
    acc = pld.PLDAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(z - 0.05), 5)
    assert acc.get_epsilon(1e-5) > 3.0


def test_fixed_size_full_cohort_needs_twice_the_noise_of_add_remove() -> None:
    # With the whole population in every round, fixed_size is a Gaussian under replace-one
    # adjacency (sensitivity 2C): its z must be twice the add/remove Gaussian's. Reference:
    # the hand-written RDP curve steps·α/(2 (z/2)²).
    zf = calibrate_noise_multiplier(4.0, 1e-5, 40, 1.0, sampling="fixed_size", population=50)
    zn = calibrate_noise_multiplier(4.0, 1e-5, 40, 1.0, sampling="none")
    assert zf == pytest.approx(2 * zn, abs=4 * TOL)
    orders = np.asarray(rdp.RdpAccountant().orders)
    assert rdp.compute_epsilon(orders, 40 * orders / (2 * (zf / 2) ** 2), 1e-5)[0] <= 4.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"target_epsilon": 0.0}, "target_epsilon"),
        ({"delta": 1.0}, "delta"),
        ({"steps": 0}, "steps"),
        ({"q": 0.0}, "q="),
        ({"sampling": "fixed_size"}, "population"),
        ({"sampling": "fixed_size", "population": 333}, "whole cohort"),
        ({"sampling": "fixed_size", "accountant": "pld", "population": 1000}, "rdp"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"target_epsilon": 2.0, "delta": 1e-5, "steps": 10, "q": 0.01}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        calibrate_noise_multiplier(**args)  # type: ignore[arg-type]
