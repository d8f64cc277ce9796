"""The smallest noise multiplier that keeps a planned run within a target (ε, δ).

For reporting and for choosing z before a run (e.g. ``asyncfl experiment dp`` at
ε ∈ {1, 2, 4, 8}). The search is dp-accounting's ``calibrate_dp_mechanism`` (Brent's
method with a bisection fallback) over the same per-release events the accountant records
(:meth:`asyncfl.privacy.accounting.Release.dp_event`); it guarantees ε(z) <= target.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

import dp_accounting
from dp_accounting import mechanism_calibration, pld, rdp

from asyncfl.privacy.accounting import Release, neighboring_relation
from asyncfl.privacy.config import AccountantKind, SamplingScheme

__all__ = ["calibrate_noise_multiplier"]


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    steps: int,
    q: float,
    *,
    sampling: SamplingScheme = "poisson",
    accountant: AccountantKind = "rdp",
    population: int | None = None,
    tolerance: float = 1e-3,
) -> float:
    """Smallest z (within ``tolerance``) with ε(δ) <= ``target_epsilon`` after ``steps`` releases.

    ``q`` is the sampling probability (cohort / population; K / population for
    ``async_approx``; ignored for ``none``). ``sampling="fixed_size"`` needs ``population``
    with ``q * population`` an integer (the cohort size). Raises ``ValueError`` for bad
    arguments or when no z in [1e-2, 1e-2 · 2^30] reaches the target.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon={target_epsilon!r} must be a finite number > 0")
    if not 0 < delta < 1:
        raise ValueError(f"delta={delta!r} must be in (0, 1)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an integer >= 1")
    if not 0 < q <= 1:
        raise ValueError(f"q={q!r} must be in (0, 1]")
    if not tolerance > 0:
        raise ValueError(f"tolerance={tolerance!r} must be > 0")
    if accountant == "pld" and sampling == "fixed_size":
        raise ValueError("sampling='fixed_size' needs accountant='rdp'")
    cohort, pop = _cohort_and_population(q, sampling, population)

    def make_event(z: float) -> dp_accounting.DpEvent:
        release = Release(sampling, z, cohort, pop)
        return dp_accounting.SelfComposedDpEvent(release.dp_event(), steps)

    relation = neighboring_relation(sampling)

    def rdp_accountant() -> dp_accounting.PrivacyAccountant:
        return rdp.RdpAccountant(neighboring_relation=relation)

    def pld_accountant() -> dp_accounting.PrivacyAccountant:
        return pld.PLDAccountant(neighboring_relation=relation)

    # RDP first, searched from z = 0.01 upward: cheap at any z.
    z_rdp = _calibrate(
        rdp_accountant,
        make_event,
        target_epsilon,
        delta,
        tolerance,
        mechanism_calibration.LowerEndpointAndGuess(1e-2, 1.0),
        steps,
        q,
    )
    if accountant == "rdp":
        return z_rdp

    # PLD's cost (time and memory) explodes as z -> 0 (a PLD at z = 0.01 needs tens of
    # GB), so never start there: bracket around the RDP answer, which PLD (being tighter)
    # usually undercuts by well under a factor of 2.
    def pld_eps(z: float) -> float:
        return float(pld_accountant().compose(make_event(z)).get_epsilon(delta))

    high = z_rdp
    for _ in range(8):
        if pld_eps(high) <= target_epsilon:
            break
        high *= 1.5
    low = high / 2
    for _ in range(4):
        if pld_eps(low) > target_epsilon:
            break
        low /= 2
    bracket = mechanism_calibration.ExplicitBracketInterval(low, high)
    return _calibrate(
        pld_accountant, make_event, target_epsilon, delta, tolerance, bracket, steps, q
    )


def _calibrate(
    make_accountant: Callable[[], dp_accounting.PrivacyAccountant],
    make_event: Callable[[float], dp_accounting.DpEvent],
    target_epsilon: float,
    delta: float,
    tolerance: float,
    bracket: mechanism_calibration.BracketInterval,
    steps: int,
    q: float,
) -> float:
    try:
        z = mechanism_calibration.calibrate_dp_mechanism(
            make_accountant,
            make_event,
            target_epsilon,
            delta,
            bracket_interval=bracket,
            tol=tolerance,
        )
    except (mechanism_calibration.NoBracketIntervalFoundError, ValueError) as exc:
        raise ValueError(
            f"no noise multiplier reaches epsilon={target_epsilon} at delta={delta} "
            f"after {steps} steps with q={q}; raise the target or lower steps/q"
        ) from exc
    return float(z)


def _cohort_and_population(
    q: float, sampling: SamplingScheme, population: int | None
) -> tuple[int, int]:
    if sampling == "fixed_size":
        if population is None or population < 1:
            raise ValueError("sampling='fixed_size' needs population= (an integer >= 1)")
        cohort = round(q * population)
        if cohort < 1 or abs(cohort - q * population) > 1e-9 * population:
            raise ValueError(
                f"q * population = {q * population} must be a whole cohort size for fixed_size"
            )
        return cohort, population
    # Only q matters to the other schemes. Fraction(q) is exact for a float, and int / int
    # division is correctly rounded, so cohort / population reproduces q bit for bit.
    exact = Fraction(q)
    return exact.numerator, exact.denominator
