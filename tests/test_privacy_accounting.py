"""Accounting: epsilons equal dp-accounting's for the same events; the budget is never exceeded."""

from __future__ import annotations

import json
import math
from typing import Any

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncfl.errors import ConfigError, PrivacyBudgetExceeded
from asyncfl.privacy import PrivacyAccountant, PrivacyConfig

ADD_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE


def _config(**kw: Any) -> PrivacyConfig:
    base: dict[str, Any] = {
        "noise_multiplier": 1.1,
        "clip_norm": 0.7,
        "cohort_size": 100,
        "population": 10_000,
        "delta": 1e-5,
    }
    base.update(kw)
    return PrivacyConfig(**base)


def _reference(kind: str, relation: Any, event: Any, steps: int, delta: float) -> float:
    acc = (
        rdp.RdpAccountant(neighboring_relation=relation)
        if kind == "rdp"
        else (pld.PLDAccountant(neighboring_relation=relation))
    )
    acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return float(acc.get_epsilon(delta))


G = dp_accounting.GaussianDpEvent
CASES = [
    # (config overrides, steps, reference accountant, relation, reference event)
    (
        {"noise_multiplier": 1.07, "cohort_size": 130, "delta": 1e-6},
        370,
        "rdp",
        ADD_REMOVE,
        dp_accounting.PoissonSampledDpEvent(0.013, G(1.07)),
    ),
    (
        {"noise_multiplier": 0.93, "cohort_size": 200, "accountant": "pld"},
        150,
        "pld",
        ADD_REMOVE,
        dp_accounting.PoissonSampledDpEvent(0.02, G(0.93)),
    ),
    (
        {"noise_multiplier": 1.3, "cohort_size": 97, "population": 5003, "sampling": "fixed_size"},
        210,
        "rdp",
        REPLACE_ONE,
        # Replace-one moves the clipped sum by up to 2C: the event's multiplier is z / 2.
        dp_accounting.SampledWithoutReplacementDpEvent(5003, 97, G(0.65)),
    ),
    (
        {
            "noise_multiplier": 1.21,
            "cohort_size": 31,
            "population": 2900,
            "sampling": "async_approx",
        },
        480,
        "rdp",
        ADD_REMOVE,
        dp_accounting.PoissonSampledDpEvent(31 / 2900, G(1.21)),
    ),
    (
        {
            "noise_multiplier": 1.21,
            "cohort_size": 31,
            "population": 2900,
            "sampling": "async_approx",
            "accountant": "pld",
        },
        90,
        "pld",
        ADD_REMOVE,
        dp_accounting.PoissonSampledDpEvent(31 / 2900, G(1.21)),
    ),
    ({"noise_multiplier": 7.3, "sampling": "none"}, 40, "rdp", ADD_REMOVE, G(7.3)),
    (
        {"noise_multiplier": 7.3, "sampling": "none", "accountant": "pld"},
        40,
        "pld",
        ADD_REMOVE,
        G(7.3),
    ),
]


@pytest.mark.parametrize("overrides,steps,kind,relation,event", CASES)
def test_epsilon_equals_dp_accounting_for_the_same_events(
    overrides: dict[str, Any], steps: int, kind: str, relation: Any, event: Any
) -> None:
    cfg = _config(**overrides)
    acc = PrivacyAccountant(cfg)
    acc.record_step(steps)
    ref = _reference(kind, relation, event, steps, cfg.delta)
    assert acc.epsilon() == pytest.approx(ref, rel=1e-12)
    assert 0.05 < ref < 100  # a meaningful regime, not a degenerate 0 or inf


def test_steps_recorded_one_by_one_equal_one_batch() -> None:
    one, batch = PrivacyAccountant(_config()), PrivacyAccountant(_config())
    for _ in range(57):
        one.record_step()
    batch.record_step(57)
    assert one.steps == batch.steps == 57
    assert one.epsilon() == batch.epsilon()
    assert one.epsilon(1e-7) > one.epsilon(1e-5)  # smaller δ costs more ε


def test_no_steps_spend_nothing() -> None:
    assert PrivacyAccountant(_config()).epsilon() == 0.0


def test_gaussian_without_amplification_matches_closed_forms() -> None:
    # T releases of a Gaussian with multiplier z compose exactly to one with z / sqrt(T).
    # Independent references: the analytic Gaussian (Balle & Wang 2018) for PLD, and the
    # hand-written RDP curve T·α / (2 z²) for RDP.
    z, steps, delta = 9.0, 25, 1e-5
    exact = dp_accounting.get_epsilon_gaussian(z / math.sqrt(steps), delta)
    p = PrivacyAccountant(_config(noise_multiplier=z, sampling="none", accountant="pld"))
    p.record_step(steps)
    assert exact <= p.epsilon() <= exact * 1.01  # PLD is a pessimistic discretisation
    r = PrivacyAccountant(_config(noise_multiplier=z, sampling="none"))
    r.record_step(steps)
    orders = np.asarray(rdp.RdpAccountant().orders)
    by_hand = rdp.compute_epsilon(orders, steps * orders / (2 * z**2), delta)[0]
    assert r.epsilon() == pytest.approx(by_hand, rel=1e-12)
    assert r.epsilon() >= exact


def test_fixed_size_full_cohort_is_a_gaussian_with_sensitivity_2c() -> None:
    z, steps = 6.0, 30
    acc = PrivacyAccountant(
        _config(
            noise_multiplier=z, sampling="fixed_size", cohort_size=500, population=500, delta=1e-3
        )
    )
    acc.record_step(steps)
    orders = np.asarray(rdp.RdpAccountant().orders)
    by_hand = rdp.compute_epsilon(orders, steps * orders / (2 * (z / 2) ** 2), 1e-3)[0]
    assert acc.epsilon() == pytest.approx(by_hand, rel=1e-12)


def test_resumed_history_with_changed_noise_composes_both_parts() -> None:
    first = PrivacyAccountant(_config(noise_multiplier=1.1))
    first.record_step(50)
    state = json.loads(json.dumps(first.state_dict()))  # plain, serialisable data
    second = PrivacyAccountant(_config(noise_multiplier=1.4))
    second.load_state_dict(state)
    second.record_step(30)
    ref = rdp.RdpAccountant()
    ref.compose(dp_accounting.PoissonSampledDpEvent(0.01, G(1.1)), 50)
    ref.compose(dp_accounting.PoissonSampledDpEvent(0.01, G(1.4)), 30)
    assert second.epsilon() == pytest.approx(ref.get_epsilon(1e-5), rel=1e-12)
    assert second.steps == 80 and len(second.history) == 2


def test_would_exceed_does_not_mutate_and_record_refuses_past_budget() -> None:
    acc = PrivacyAccountant(_config(epsilon_budget=2.0))
    n = acc.remaining_steps()
    # Boundary checked against dp-accounting directly.
    event = dp_accounting.PoissonSampledDpEvent(0.01, G(1.1))
    assert _reference("rdp", ADD_REMOVE, event, n, 1e-5) <= 2.0
    assert _reference("rdp", ADD_REMOVE, event, n + 1, 1e-5) > 2.0
    assert not acc.would_exceed(steps=n)
    assert acc.would_exceed(steps=n + 1)
    assert acc.steps == 0
    acc.record_step(n - 1)
    before = (acc.state_dict(), acc.epsilon())
    with pytest.raises(PrivacyBudgetExceeded, match="epsilon_budget=2"):
        acc.record_step(2)
    assert (acc.state_dict(), acc.epsilon()) == before
    acc.record_step()
    assert acc.would_exceed()
    with pytest.raises(PrivacyBudgetExceeded):
        acc.record_step()
    assert acc.steps == n and acc.epsilon() <= 2.0


def test_pld_budget_guard_stops_at_the_boundary() -> None:
    cfg = _config(noise_multiplier=5.0, sampling="none", accountant="pld", epsilon_budget=1.5)
    acc = PrivacyAccountant(cfg)
    taken = 0
    while not acc.would_exceed():
        acc.record_step()
        taken += 1
    assert _reference("pld", ADD_REMOVE, G(5.0), taken, 1e-5) <= 1.5
    assert _reference("pld", ADD_REMOVE, G(5.0), taken + 1, 1e-5) > 1.5
    with pytest.raises(PrivacyBudgetExceeded):
        acc.record_step()


def test_explicit_budget_and_no_budget() -> None:
    acc = PrivacyAccountant(_config())
    assert not acc.would_exceed()  # no budget configured
    with pytest.raises(ValueError, match="no budget"):
        acc.remaining_steps()
    acc.record_step(100)
    spent = acc.epsilon()
    assert acc.would_exceed(budget=spent * 0.99)
    assert acc.remaining_steps(budget=spent * 0.99) == 0
    assert not acc.would_exceed(budget=spent * 2)


def test_bad_state_dict_reports_every_problem_and_changes_nothing() -> None:
    acc = PrivacyAccountant(_config())
    acc.record_step(5)
    before = acc.state_dict()
    bad: Any = {
        "format": 1,
        "runs": [
            {
                "sampling": "poisson",
                "noise_multiplier": -1.0,
                "cohort_size": 10,
                "population": 100,
                "count": 3,
            },
            {
                "sampling": "fixed_size",
                "noise_multiplier": 1.0,
                "cohort_size": 10,
                "population": 100,
                "count": 2,
            },
            {
                "sampling": "poisson",
                "noise_multiplier": 1.0,
                "cohort_size": 10,
                "population": 100,
                "count": 0,
            },
        ],
    }
    with pytest.raises(ConfigError) as err:
        acc.load_state_dict(bad)
    assert {p.path for p in err.value.problems} == {
        "runs[0].noise_multiplier",
        "runs[1].sampling",
        "runs[2].count",
    }
    assert acc.state_dict() == before
    with pytest.raises(ConfigError):
        acc.load_state_dict({"format": 99, "runs": []})


@settings(max_examples=25, deadline=None)
@given(
    z=st.floats(0.6, 4.0),
    cohort=st.integers(1, 1000),
    budget=st.floats(0.3, 10.0),
    counts=st.lists(st.integers(1, 60), min_size=1, max_size=8),
    sampling=st.sampled_from(["poisson", "none"]),
)
def test_budget_is_never_exceeded_after_any_sequence_of_guarded_steps(
    z: float, cohort: int, budget: float, counts: list[int], sampling: str
) -> None:
    cfg = _config(
        noise_multiplier=z,
        cohort_size=cohort,
        population=2000,
        epsilon_budget=budget,
        sampling=sampling,
        delta=1e-4,
    )
    acc = PrivacyAccountant(cfg)
    for c in counts:
        before = acc.state_dict()
        try:
            acc.record_step(c)
        except PrivacyBudgetExceeded:
            assert acc.state_dict() == before
            assert acc.epsilon_after(c) > budget  # refusals are not spurious
        assert acc.epsilon() <= budget
