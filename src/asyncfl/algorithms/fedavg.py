"""FedAvg with rounds made of events (McMahan et al. 2017; Bonawitz et al. 2019 for the
production rules: over-selection, round deadline, minimum number of reports).

A round is identified by the model version its clients downloaded, not by hidden state: an
update whose ``base_version`` is not the current version belongs to a finished round and is
rejected as ``late``. The driver selects ``selection_size = ceil(C * (1 + o))`` clients; the
first ``C`` accepted updates close the round with one server step on their example-weighted
mean. ``on_deadline(version)`` closes the round early: it steps if at least
``min_updates`` arrived, otherwise the round fails and its updates are discarded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from asyncfl.algorithms.base import Aggregator, Finalizer, Outcome
from asyncfl.core.server_opt import ServerOptimizer
from asyncfl.core.update import FloatVector, Update
from asyncfl.core.weights import ExampleWeighting, example_weight
from asyncfl.errors import ConfigProblem

__all__ = ["FedAvg", "FedAvgConfig"]


@dataclass(frozen=True)
class FedAvgConfig:
    name: Literal["fedavg"] = "fedavg"
    """Selects synchronous FedAvg."""
    cohort_size: int = 10
    """C: updates that close a round."""
    over_selection: float = 0.0
    """o: the driver selects ceil(C * (1 + o)) clients and keeps the first C."""
    round_deadline_s: float | None = None
    """Seconds after a round starts when the driver calls ``on_deadline``; null waits for all."""
    min_updates: int = 1
    """Fewest updates a round closed by its deadline (or by dropouts) may step with."""
    example_weighting: ExampleWeighting = "linear"
    """Weight of each update in the mean: linear = example-weighted (McMahan et al.)."""

    @property
    def selection_size(self) -> int:
        return math.ceil(self.cohort_size * (1.0 + self.over_selection) - 1e-9)

    def validate(self) -> list[ConfigProblem]:
        out: list[ConfigProblem] = []
        if self.cohort_size < 1:
            out.append(ConfigProblem("cohort_size", self.cohort_size, "an integer >= 1"))
        if self.over_selection < 0:
            out.append(ConfigProblem("over_selection", self.over_selection, "a number >= 0"))
        if self.round_deadline_s is not None and self.round_deadline_s <= 0:
            out.append(ConfigProblem("round_deadline_s", self.round_deadline_s, "null or > 0"))
        if not 1 <= self.min_updates <= max(self.cohort_size, 1):
            out.append(
                ConfigProblem(
                    "min_updates",
                    self.min_updates,
                    f"an integer in [1, cohort_size={self.cohort_size}]",
                )
            )
        return out


class FedAvg(Aggregator):
    def __init__(
        self,
        cfg: FedAvgConfig,
        params: FloatVector,
        optimizer: ServerOptimizer,
        finalize: Finalizer | None = None,
    ) -> None:
        super().__init__(params, optimizer, finalize)
        self.cfg = cfg

    def on_update(self, update: Update) -> Outcome:
        bad = self._check(update)
        if bad is not None:
            return bad
        if update.base_version != self.version:
            return self._reject(
                "late",
                f"update is for round {update.base_version}, current round is {self.version}",
                self.version - update.base_version,
            )
        e = example_weight(self.cfg.example_weighting, update.num_examples)
        self._add(update, e, e)
        if self.buffered < self.cfg.cohort_size:
            return Outcome(accepted=True, weight=e)
        step, discarded = self._flush()
        return Outcome(accepted=True, weight=e, step=step, discarded=discarded)

    def on_deadline(self, version: int) -> Outcome:
        """Close round ``version`` now. A deadline for a round that already stepped is a no-op."""
        if version != self.version:
            return Outcome(accepted=True)
        if self.buffered >= self.cfg.min_updates:
            step, discarded = self._flush()
            return Outcome(accepted=True, step=step, discarded=discarded)
        return Outcome(accepted=True, reason="round_failed", discarded=self._discard())
