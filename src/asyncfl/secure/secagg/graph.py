"""SecAgg+ communication graphs and the choice of their degree and threshold.

Bell, Bonawitz, Gascón, Lepoint, Raykova, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020: clients agree pairwise masks and hold Shamir shares
only for their neighbours in a sparse random graph of degree ``k = O(log n)`` instead of the
complete graph of Bonawitz et al. (CCS 2017), so per-client cost drops from O(n) to O(log n).

Graph. We use the Harary-style circulant graph on a uniformly random cyclic order of the
clients: each client is adjacent to the ``k/2`` clients before and after it (``k`` even). Its
neighbourhood is a uniformly random ``k``-subset of the other ``n - 1`` clients, and any two
consecutive surviving clients in the cyclic order that are at most ``k/2`` apart are adjacent.

Parameters (our instantiation of the conditions of Bell et al., §4/Thm. 3.6, with exact
hypergeometric tails instead of their Chernoff bounds). A client's secrets are shared among
its ``k`` neighbours and itself, threshold ``t``. Let ``C = ceil(gamma n)`` clients be corrupt
(colluding with the server) and ``D = ceil(delta n)`` drop out, both independent of the graph,
as in Bell et al.'s model. With ``H(N, K, k)`` the hypergeometric law of bad nodes in a
random ``k``-subset of ``N`` nodes of which ``K`` are bad, we require, by union bounds over the
``n`` clients:

1. secrecy: ``n * P[H(n-1, C, k) >= t] <= 2^-sigma`` — no honest client has ``t`` corrupt
   holders, so the server cannot obtain both its self-mask seed and its mask key (honest
   holders reveal only one of the two, enforced by the client machine);
2. no split: ``t > (k+1)/2`` — a server that sends different survivor sets to different
   holders cannot collect ``t`` shares of both kinds from honest holders;
3. connectivity: ``n * (alpha)^(k/2) <= 2^-sigma`` with ``alpha = (C + D)/n`` — the honest
   survivors stay connected (otherwise the server learns partial sums of components); the
   circulant graph only disconnects if ``k/2`` consecutive clients in the order are removed;
4. correctness: ``n * P[H(n-1, D, k) > k - t] <= 2^-eta`` — every client keeps ``t`` surviving
   holders among its neighbours, so its secrets can be reconstructed.

:func:`choose_parameters` returns the smallest even ``k`` (with the smallest ``t`` allowed by
1 and 2) that meets all four, or the complete graph (plain SecAgg) if none below ``n - 1`` does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from asyncfl.errors import ConfigError, ConfigProblem

__all__ = [
    "Graph",
    "SecAggPlusParams",
    "choose_parameters",
    "complete_graph",
    "harary_graph",
    "hypergeometric_tail",
]

Graph = Mapping[int, frozenset[int]]


def complete_graph(ids: Iterable[int]) -> dict[int, frozenset[int]]:
    """Every client adjacent to every other (plain SecAgg, Bonawitz et al. 2017)."""
    members = frozenset(ids)
    return {u: members - {u} for u in members}


def harary_graph(
    ids: Iterable[int], degree: int, rng: np.random.Generator
) -> dict[int, frozenset[int]]:
    """Circulant graph of even ``degree`` over a random cyclic order of ``ids``."""
    order = sorted(set(ids))
    n = len(order)
    if degree % 2 or not 2 <= degree <= n - 1:
        raise ValueError(f"degree={degree} must be even and in [2, n - 1 = {n - 1}]")
    perm = [order[i] for i in rng.permutation(n)]
    half = degree // 2
    return {
        perm[i]: frozenset(perm[(i + d) % n] for d in range(-half, half + 1) if d != 0)
        for i in range(n)
    }


def hypergeometric_tail(population: int, bad: int, draws: int, at_least: int) -> float:
    """``P[X >= at_least]`` for ``X`` hypergeometric (exact big-int arithmetic, then divided)."""
    if at_least <= 0:
        return 1.0
    hi = min(bad, draws)
    num = sum(
        math.comb(bad, i) * math.comb(population - bad, draws - i) for i in range(at_least, hi + 1)
    )
    return num / math.comb(population, draws)


@dataclass(frozen=True)
class SecAggPlusParams:
    """Degree ``k``, threshold ``t`` and the log2 failure bounds they achieve.

    ``log2_secrecy_failure`` is the larger of conditions 1 and 3, ``log2_correctness_failure``
    condition 4 (``-inf`` when the event is impossible).
    """

    degree: int
    threshold: int
    log2_secrecy_failure: float
    log2_correctness_failure: float
    complete: bool


def _log2(p: float) -> float:
    return math.log2(p) if p > 0 else -math.inf


def choose_parameters(
    n: int, corrupt_fraction: float, dropout_fraction: float, sigma: float = 40.0, eta: float = 30.0
) -> SecAggPlusParams:
    """Smallest even degree and its threshold meeting conditions 1–4 of the module docstring."""
    problems = []
    if n < 3:
        problems.append(ConfigProblem("n", n, "an int >= 3"))
    if not 0 <= corrupt_fraction < 1:
        problems.append(ConfigProblem("corrupt_fraction", corrupt_fraction, "in [0, 1)"))
    if not 0 <= dropout_fraction < 1:
        problems.append(ConfigProblem("dropout_fraction", dropout_fraction, "in [0, 1)"))
    if corrupt_fraction + dropout_fraction >= 0.5:
        problems.append(
            ConfigProblem(
                "corrupt_fraction + dropout_fraction",
                corrupt_fraction + dropout_fraction,
                "< 0.5 (an honest surviving majority is needed)",
            )
        )
    if sigma <= 0 or eta <= 0:
        problems.append(ConfigProblem("sigma, eta", (sigma, eta), "both > 0"))
    if problems:
        raise ConfigError(problems)
    corrupt = math.ceil(corrupt_fraction * n)
    dropped = math.ceil(dropout_fraction * n)
    log2n = math.log2(n)
    for k in range(2, n - 1, 2):
        sec = [log2n + _log2(hypergeometric_tail(n - 1, corrupt, k, t)) for t in range(k + 2)]
        t = next((t for t in range(k // 2 + 1, k + 2) if sec[t] <= -sigma and 2 * t > k + 1), None)
        if t is None:
            continue
        removed = (corrupt + dropped) / n
        split = log2n + (k / 2) * _log2(removed)
        if split > -sigma:
            continue
        corr = log2n + _log2(hypergeometric_tail(n - 1, dropped, k, k - t + 1))
        if corr <= -eta:
            return SecAggPlusParams(k, t, max(sec[t], split), corr, complete=False)
    return _complete_params(n, corrupt, dropped)


def _complete_params(n: int, corrupt: int, dropped: int) -> SecAggPlusParams:
    """Complete graph: t must exceed the corrupt holders and half the holders, and survive D."""
    t = max(corrupt + 1, n // 2 + 1)
    if n - dropped < t:
        raise ConfigError(
            [
                ConfigProblem(
                    "n, corrupt_fraction, dropout_fraction",
                    (n, corrupt, dropped),
                    f"n - dropped >= t = {t}: too many dropouts for a secure threshold",
                )
            ]
        )
    return SecAggPlusParams(n - 1, t, -math.inf, -math.inf, complete=True)
