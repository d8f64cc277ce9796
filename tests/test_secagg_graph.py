"""SecAgg+ graphs and parameter choice (Bell et al., CCS 2020), against scipy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats  # type: ignore[import-untyped]

from asyncfl.errors import ConfigError
from asyncfl.secure.secagg.graph import (
    choose_parameters,
    complete_graph,
    harary_graph,
    hypergeometric_tail,
)


def test_harary_graph_is_k_regular_symmetric_and_connected() -> None:
    ids = list(range(5, 305, 3))
    g = harary_graph(ids, 8, np.random.default_rng(1))
    assert set(g) == set(ids)
    assert all(len(nb) == 8 and u not in nb for u, nb in g.items())
    assert all(u in g[v] for u, nb in g.items() for v in nb)
    seen, todo = {ids[0]}, [ids[0]]
    while todo:
        for v in g[todo.pop()] - seen:
            seen.add(v)
            todo.append(v)
    assert seen == set(ids)
    # Random: a different seed gives a different graph.
    assert g != harary_graph(ids, 8, np.random.default_rng(2))
    with pytest.raises(ValueError, match="even"):
        harary_graph(ids, 7, np.random.default_rng(0))


def test_hypergeometric_tail_matches_scipy() -> None:
    for pop, bad, draws, k in [(99, 10, 30, 5), (499, 50, 46, 25), (999, 0, 20, 1)]:
        ref = stats.hypergeom.sf(k - 1, pop, bad, draws)
        assert hypergeometric_tail(pop, bad, draws, k) == pytest.approx(ref, rel=1e-9, abs=1e-300)


@pytest.mark.parametrize(
    ("n", "gamma", "delta"), [(100, 0.0, 0.1), (500, 0.05, 0.1), (2000, 0.1, 0.1)]
)
def test_chosen_parameters_meet_the_stated_conditions_and_are_minimal(
    n: int, gamma: float, delta: float
) -> None:
    sigma, eta = 40.0, 30.0
    p = choose_parameters(n, gamma, delta, sigma, eta)
    k, t = p.degree, p.threshold
    c, d = math.ceil(gamma * n), math.ceil(delta * n)
    assert not p.complete and k % 2 == 0 and k < 4 * math.log2(n) ** 2  # polylog, far below n
    assert 2 * t > k + 1
    assert n * stats.hypergeom.sf(t - 1, n - 1, c, k) <= 2**-sigma
    assert n * ((c + d) / n) ** (k / 2) <= 2**-sigma
    assert n * stats.hypergeom.sf(k - t, n - 1, d, k) <= 2**-eta
    # Minimal: no smaller even degree satisfies all conditions with any threshold.
    for k2 in range(2, k, 2):
        ok_t = [
            t2
            for t2 in range(k2 // 2 + 1, k2 + 2)
            if 2 * t2 > k2 + 1
            and n * stats.hypergeom.sf(t2 - 1, n - 1, c, k2) <= 2**-sigma
            and n * stats.hypergeom.sf(k2 - t2, n - 1, d, k2) <= 2**-eta
        ]
        assert not ok_t or n * ((c + d) / n) ** (k2 / 2) > 2**-sigma


def test_small_cohorts_fall_back_to_the_complete_graph_and_bad_inputs_are_named() -> None:
    p = choose_parameters(10, 0.1, 0.1)
    assert p.complete and p.degree == 9 and p.threshold == 6
    assert complete_graph([1, 2, 3]) == {1: {2, 3}, 2: {1, 3}, 3: {1, 2}}
    with pytest.raises(ConfigError) as info:
        choose_parameters(100, 0.3, 0.3, sigma=-1)
    paths = {pr.path for pr in info.value.problems}
    assert paths == {"corrupt_fraction + dropout_fraction", "sigma, eta"}
