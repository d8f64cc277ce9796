"""Privacy accounting of user-level DP federated training, on top of Google's dp-accounting.

Every server step releases ``(Σ clipped updates + N(0, (zC)²)) / D`` once; each release is
one DpEvent, and the run's (ε, δ) is their composition computed by dp-accounting's RDP
accountant (Mironov 2017; sampled Gaussian of Mironov, Talwar & Zhang 2019) or PLD
accountant (Koskela et al. 2020; Doroshenko et al. 2022). This module only chooses the
events; it implements none of the RDP/PLD math.

What one release is, per :data:`~asyncfl.privacy.config.SamplingScheme`:

``poisson`` (sync FedAvg, Poisson sampling; add/remove-one-user adjacency)
    ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` with q = cohort_size / population.
``fixed_size`` (sync FedAvg, cohort of exactly m users drawn without replacement)
    ``SampledWithoutReplacementDpEvent(population, m, GaussianDpEvent(z / 2))`` under
    replace-one adjacency (Wang, Balle & Kasiviswanathan 2019, Thm 27). The event's
    multiplier is std / sensitivity, and replacing one user's clipped update by another's
    moves the sum by up to 2C, hence z / 2. RDP only (dp-accounting's PLD lacks it).
``async_approx`` (FedBuff, the standard approximation)
    ``PoissonSampledDpEvent(K / population, GaussianDpEvent(z))`` per release of K updates.
    Asynchronous arrival is not Poisson sampling (whether a user is in a release depends
    on device speed and timing), so this is an approximation, not a proof; use ``none``
    for a bound that holds.
``none`` (no amplification; conservative, sync or async)
    ``GaussianDpEvent(z)`` per release: every release is treated as a full Gaussian
    mechanism on every user's contribution. It holds, under add/remove adjacency and
    adaptive composition, whatever the selection and timing, PROVIDED each user
    contributes at most one (clipped) update per release; if a user could contribute k
    times to one release, the sensitivity is kC and z / k must be accounted instead.

With adaptive clipping the config's ``noise_multiplier`` is the TOTAL z of update and
clip count together (see :mod:`asyncfl.privacy.adaptive_clip`), so it is what is recorded.
Under replace-one (``fixed_size``) both sensitivities double (2C, and 1 for the centred
bit), so the pair still composes like one Gaussian, now with z / 2, as recorded.

The stateful :class:`PrivacyAccountant` keeps the history as run-length-encoded releases
(``state_dict()`` is that history, so a restart resumes) and guards a budget: a step that
would take ε(δ) past ``epsilon_budget`` raises :class:`PrivacyBudgetExceeded` and changes
nothing.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import dp_accounting
import numpy as np
import numpy.typing as npt
from dp_accounting import pld, rdp

from asyncfl.errors import ConfigError, ConfigProblem, PrivacyBudgetExceeded
from asyncfl.privacy.config import AccountantKind, PrivacyConfig, SamplingScheme

__all__ = [
    "AccountedRun",
    "PrivacyAccountant",
    "PrivacyAccountantStateDict",
    "Release",
    "compute_epsilon",
    "neighboring_relation",
]

_STATE_FORMAT = 1
_ABSENT: Any = None  # default for a missing checkpoint field; typed Any, validated later
_DEFAULT_STEP_LIMIT = 1_000_000
_SAMPLINGS: tuple[SamplingScheme, ...] = ("poisson", "fixed_size", "async_approx", "none")


def neighboring_relation(sampling: SamplingScheme) -> dp_accounting.NeighboringRelation:
    """Adjacency the analysis of ``sampling`` uses: replace-one for fixed_size, else add/remove."""
    if sampling == "fixed_size":
        return dp_accounting.NeighboringRelation.REPLACE_ONE
    return dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


@dataclass(frozen=True)
class Release:
    """One server step's mechanism, as the accountant sees it."""

    sampling: SamplingScheme
    noise_multiplier: float
    cohort_size: int
    population: int

    @classmethod
    def from_config(cls, config: PrivacyConfig) -> Release:
        return cls(config.sampling, config.noise_multiplier, config.cohort_size, config.population)

    def problems(self) -> list[ConfigProblem]:
        out: list[ConfigProblem] = []
        if self.sampling not in _SAMPLINGS:
            out.append(ConfigProblem("sampling", self.sampling, f"one of {_SAMPLINGS}"))
        z = self.noise_multiplier
        z_is_number = isinstance(z, int | float) and not isinstance(z, bool)
        if not (z_is_number and math.isfinite(z) and z > 0):
            out.append(ConfigProblem("noise_multiplier", z, "a finite number > 0"))
        for name in ("cohort_size", "population"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                out.append(ConfigProblem(name, v, "an integer >= 1"))
        if not out and self.cohort_size > self.population:
            out.append(ConfigProblem("cohort_size", self.cohort_size, "<= population"))
        return out

    def dp_event(self) -> dp_accounting.DpEvent:
        """The DpEvent of one release (module docstring gives the reasoning per scheme)."""
        gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        if self.sampling in ("poisson", "async_approx"):
            q = self.cohort_size / self.population
            return dp_accounting.PoissonSampledDpEvent(q, gaussian)
        if self.sampling == "fixed_size":
            return dp_accounting.SampledWithoutReplacementDpEvent(
                self.population,
                self.cohort_size,
                dp_accounting.GaussianDpEvent(self.noise_multiplier / 2),
            )
        return gaussian


@dataclass(frozen=True)
class AccountedRun:
    """``count`` consecutive releases of the same mechanism."""

    release: Release
    count: int


def compute_epsilon(
    runs: Sequence[AccountedRun], accountant: AccountantKind, delta: float
) -> float:
    """ε(δ) of the composition of ``runs`` (all with one neighbouring relation)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta={delta!r} must be in (0, 1)")
    runs = [r for r in runs if r.count > 0]
    if not runs:
        return 0.0
    relations = {neighboring_relation(r.release.sampling) for r in runs}
    if len(relations) != 1:
        raise ValueError(
            "cannot compose releases analysed under different adjacency relations "
            f"({sorted(r.name for r in relations)}); keep one sampling family per run"
        )
    (relation,) = relations
    if accountant == "rdp":
        # RDP composes additively, so one release's RDP curve (from dp-accounting, cached)
        # times its count is what RdpAccountant itself computes for a SelfComposedDpEvent;
        # the caching makes the budget search cheap even where the curve is slow (q ~ 0.3).
        total = np.zeros_like(_DEFAULT_ORDERS, dtype=np.float64)
        for run in runs:
            total += run.count * _rdp_curve(run.release)
        return float(rdp.compute_epsilon(_DEFAULT_ORDERS, total, delta)[0])
    if accountant == "pld":
        acc = pld.PLDAccountant(neighboring_relation=relation)
        for run in runs:
            acc.compose(dp_accounting.SelfComposedDpEvent(run.release.dp_event(), run.count))
        return float(acc.get_epsilon(delta))
    raise ValueError(f"accountant={accountant!r}; expected 'rdp' or 'pld'")


_DEFAULT_ORDERS: npt.NDArray[np.float64] = np.asarray(rdp.RdpAccountant().orders, dtype=np.float64)


@functools.lru_cache(maxsize=64)
def _rdp_curve(release: Release) -> npt.NDArray[np.float64]:
    acc = rdp.RdpAccountant(neighboring_relation=neighboring_relation(release.sampling))
    event = release.dp_event()
    if not acc.supports(event):
        raise ValueError(f"dp-accounting's RDP accountant does not support {event}")
    acc.compose(event)
    curve: npt.NDArray[np.float64] = acc.rdp
    curve.setflags(write=False)
    return curve


class PrivacyAccountantStateDict(TypedDict):
    format: int
    runs: list[dict[str, object]]


class PrivacyAccountant:
    """The privacy spent so far by a run, with a budget guard.

    ``record_step()`` once per server step (release). ``epsilon()`` reports ε at the
    config's δ. With ``epsilon_budget`` set, a step that would exceed it raises
    :class:`PrivacyBudgetExceeded` and leaves the history unchanged.

    Cost: the budget guard finds, once per history/budget, the largest number of further
    steps that stays within budget (exponential + binary search on ε), then each step is
    O(1). With RDP each ε evaluation takes microseconds; with PLD ~0.1-1 s, so the first
    guarded PLD step takes a few seconds.
    """

    def __init__(self, config: PrivacyConfig) -> None:
        config.check()
        self._config = config
        self._release = Release.from_config(config)
        self._runs: tuple[AccountedRun, ...] = ()
        self._eps_cache: dict[tuple[int, float], float] = {}
        self._remaining_cache: dict[tuple[float, float, int], int] = {}

    @property
    def config(self) -> PrivacyConfig:
        return self._config

    @property
    def history(self) -> tuple[AccountedRun, ...]:
        return self._runs

    @property
    def steps(self) -> int:
        """Releases recorded so far."""
        return sum(r.count for r in self._runs)

    def epsilon(self, delta: float | None = None) -> float:
        """ε spent so far at ``delta`` (default: the config's δ)."""
        return self.epsilon_after(0, delta)

    def epsilon_after(self, steps: int, delta: float | None = None) -> float:
        """ε if ``steps`` more releases were recorded now. Changes nothing."""
        _check_count(steps, low=0, name="steps")
        d = self._config.delta if delta is None else delta
        key = (steps, d)
        if key not in self._eps_cache:
            self._eps_cache[key] = compute_epsilon(
                self._runs_plus(steps), self._config.accountant, d
            )
        return self._eps_cache[key]

    def remaining_steps(
        self, budget: float | None = None, *, limit: int = _DEFAULT_STEP_LIMIT
    ) -> int:
        """The most further steps that keep ε(δ) <= ``budget`` (default: the config's budget).

        Returns ``limit`` when at least that many fit. Raises ``ValueError`` when there is
        no budget. Relies on ε growing with the step count, which composition guarantees
        for the true ε (and for RDP's bound exactly).
        """
        b = self._budget(budget)
        _check_count(limit, low=1, name="limit")
        key = (b, self._config.delta, limit)
        if key not in self._remaining_cache:
            self._remaining_cache[key] = self._search_remaining(b, limit)
        return self._remaining_cache[key]

    def would_exceed(self, budget: float | None = None, steps: int = 1) -> bool:
        """Whether recording ``steps`` more releases would take ε above ``budget``.

        ``budget`` defaults to the config's; with no budget at all, nothing exceeds it.
        Changes nothing.
        """
        _check_count(steps, low=1, name="steps")
        if budget is None and self._config.epsilon_budget is None:
            return False
        b = self._budget(budget)
        if steps >= _DEFAULT_STEP_LIMIT:
            return self.epsilon_after(steps) > b
        return steps > self.remaining_steps(b)

    def record_step(self, count: int = 1) -> None:
        """Record ``count`` releases; refuse (unchanged) if that would exceed the budget."""
        _check_count(count, low=1, name="count")
        if self.would_exceed(steps=count):
            raise PrivacyBudgetExceeded(
                f"{count} more step(s) would take epsilon from {self.epsilon():.4g} to "
                f"{self.epsilon_after(count):.4g} at delta={self._config.delta:g}, above "
                f"epsilon_budget={self._config.epsilon_budget:g}; stop training, or raise "
                "the budget / noise_multiplier"
            )
        self._runs = self._runs_plus(count)
        # Shift caches rather than drop them: "n more after recording count" is exactly
        # "count + n more before", computed from the same merged runs.
        self._eps_cache = {(n - count, d): e for (n, d), e in self._eps_cache.items() if n >= count}
        # A cached value equal to its limit means "at least limit": it cannot be shifted.
        self._remaining_cache = {k: v - count for k, v in self._remaining_cache.items() if v < k[2]}

    def state_dict(self) -> PrivacyAccountantStateDict:
        """The release history (plain data), enough to resume after a restart."""
        return {
            "format": _STATE_FORMAT,
            "runs": [
                {
                    "sampling": r.release.sampling,
                    "noise_multiplier": r.release.noise_multiplier,
                    "cohort_size": r.release.cohort_size,
                    "population": r.release.population,
                    "count": r.count,
                }
                for r in self._runs
            ],
        }

    def load_state_dict(self, state: PrivacyAccountantStateDict) -> None:
        """Replace the history with a checkpoint's; validates all of it before changing anything.

        The history may hold releases with other parameters (e.g. a changed noise
        multiplier) but not another adjacency relation than the config's sampling.
        """
        problems: list[ConfigProblem] = []
        fmt = state.get("format")
        if fmt != _STATE_FORMAT:
            problems.append(ConfigProblem("format", fmt, f"{_STATE_FORMAT}"))
        raw_runs: object = state.get("runs")
        runs: list[AccountedRun] = []
        if not isinstance(raw_runs, list):
            problems.append(ConfigProblem("runs", raw_runs, "a list of runs"))
            raw_runs = []
        want = neighboring_relation(self._config.sampling)
        for i, raw in enumerate(raw_runs):
            path = f"runs[{i}]"
            if not isinstance(raw, dict):
                problems.append(ConfigProblem(path, raw, "a mapping"))
                continue
            # Built from unchecked plain data on purpose: Release.problems() checks it.
            release = Release(
                raw.get("sampling", _ABSENT),
                raw.get("noise_multiplier", _ABSENT),
                raw.get("cohort_size", _ABSENT),
                raw.get("population", _ABSENT),
            )
            bad = release.problems()
            problems.extend(ConfigProblem(f"{path}.{p.path}", p.value, p.expected) for p in bad)
            count = raw.get("count")
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                problems.append(ConfigProblem(f"{path}.count", count, "an integer >= 1"))
                continue
            if bad:
                continue
            if neighboring_relation(release.sampling) != want:
                problems.append(
                    ConfigProblem(
                        f"{path}.sampling",
                        release.sampling,
                        f"a scheme analysed like the config's {self._config.sampling!r}",
                    )
                )
                continue
            runs.append(AccountedRun(release, count))
        if problems:
            raise ConfigError(problems)
        self._runs = _merge(runs)
        self._eps_cache = {}
        self._remaining_cache = {}

    def _budget(self, budget: float | None) -> float:
        b = self._config.epsilon_budget if budget is None else budget
        if b is None:
            raise ValueError("no budget: pass budget= or set epsilon_budget in the config")
        if not (math.isfinite(b) and b > 0):
            raise ValueError(f"budget={b!r} must be a finite number > 0")
        return b

    def _runs_plus(self, steps: int) -> tuple[AccountedRun, ...]:
        if steps == 0:
            return self._runs
        return _merge([*self._runs, AccountedRun(self._release, steps)])

    def _search_remaining(self, budget: float, limit: int) -> int:
        def fits(n: int) -> bool:
            return self.epsilon_after(n) <= budget

        if not fits(0):
            return 0  # already above (the budget was lowered, or the history changed)
        guess = 1
        if self._config.accountant == "pld":
            # Start where RDP's bound stops (microseconds to find): PLD is usually a bit
            # tighter, so the search only evaluates PLD near the answer, never at the huge
            # step counts a blind doubling could reach (each PLD evaluation's time and
            # memory grow with the step count).
            delta = self._config.delta

            def fits_rdp(n: int) -> bool:
                return compute_epsilon(self._runs_plus(n), "rdp", delta) <= budget

            guess = _largest_fitting(fits_rdp, 1, limit)
        return _largest_fitting(fits, max(guess, 1), limit)


def _largest_fitting(fits: Callable[[int], bool], guess: int, limit: int) -> int:
    """Largest n in [0, limit] with fits(n), given fits(0) and fits monotone decreasing."""
    guess = min(guess, limit)
    if fits(guess):
        lo, step = guess, guess
        while True:  # gallop up: fits(lo)
            if lo >= limit:
                return limit
            hi = min(lo + step, limit)
            if not fits(hi):
                break
            lo, step = hi, step * 2
    else:
        lo, hi = 0, guess
    while hi - lo > 1:  # fits(lo) and not fits(hi)
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _merge(runs: Sequence[AccountedRun]) -> tuple[AccountedRun, ...]:
    out: list[AccountedRun] = []
    for run in runs:
        if out and out[-1].release == run.release:
            out[-1] = AccountedRun(run.release, out[-1].count + run.count)
        else:
            out.append(run)
    return tuple(out)


def _check_count(value: int, *, low: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}")
