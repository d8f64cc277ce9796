"""FedBuff: buffered asynchronous aggregation (Nguyen et al., AISTATS 2022, Algorithm 1).

Clients train at their own pace from whatever model version they downloaded. The server
adds each arriving delta, weighted by its staleness ``s = version_at_arrival - base_version``
and by its example count, into a buffer and takes one server-optimizer step every ``K``
updates:

    g = sum_{i in buffer} w(s_i) * e(n_i) * delta_i / sum_i e(n_i)

With ``example_weighting="equal"`` the denominator is ``K``, the paper's
``Delta_bar / K``. Updates staler than ``max_staleness`` are rejected and counted.
``concurrency`` (Mc) is how many clients the driver keeps training; the algorithm itself
never needs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from asyncfl.algorithms.base import Aggregator, Finalizer, Outcome
from asyncfl.core.server_opt import ServerOptimizer
from asyncfl.core.update import FloatVector, Update
from asyncfl.core.weights import ExampleWeighting, StalenessConfig, example_weight
from asyncfl.errors import ConfigProblem

__all__ = ["FedBuff", "FedBuffConfig"]


@dataclass(frozen=True)
class FedBuffConfig:
    name: Literal["fedbuff"] = "fedbuff"
    """Selects FedBuff."""
    concurrency: int = 100
    """Mc: clients training at any time (kept by the driver)."""
    buffer_size: int = 10
    """K: updates per server step."""
    staleness: StalenessConfig = field(default_factory=StalenessConfig)
    """Staleness weighting of each update."""
    max_staleness: int | None = None
    """Reject (and count) updates staler than this; null accepts all."""
    example_weighting: ExampleWeighting = "equal"
    """Per-update weight from its example count: equal (the paper), linear, sqrt, log."""

    def validate(self) -> list[ConfigProblem]:
        out: list[ConfigProblem] = []
        if self.concurrency < 1:
            out.append(ConfigProblem("concurrency", self.concurrency, "an integer >= 1"))
        if self.buffer_size < 1:
            out.append(ConfigProblem("buffer_size", self.buffer_size, "an integer >= 1"))
        if self.max_staleness is not None and self.max_staleness < 0:
            out.append(ConfigProblem("max_staleness", self.max_staleness, "null or >= 0"))
        out += self.staleness.validate("staleness")
        return out


class FedBuff(Aggregator):
    def __init__(
        self,
        cfg: FedBuffConfig,
        params: FloatVector,
        optimizer: ServerOptimizer,
        *,
        mixing_rate: float = 1.0,
        finalize: Finalizer | None = None,
    ) -> None:
        super().__init__(params, optimizer, finalize)
        self.cfg = cfg
        # FedAsync's alpha: a constant factor on every staleness weight.
        self._mixing_rate = mixing_rate

    def on_update(self, update: Update) -> Outcome:
        bad = self._check(update)
        if bad is not None:
            return bad
        s = self.version - update.base_version
        if self.cfg.max_staleness is not None and s > self.cfg.max_staleness:
            return self._reject(
                "too_stale", f"staleness {s} > max_staleness {self.cfg.max_staleness}", s
            )
        e = example_weight(self.cfg.example_weighting, update.num_examples)
        w = self._mixing_rate * self.cfg.staleness.weight(s) * e
        self._add(update, w, e)
        if self.buffered < self.cfg.buffer_size:
            return Outcome(accepted=True, staleness=s, weight=w)
        step, discarded = self._flush()
        return Outcome(accepted=True, staleness=s, weight=w, step=step, discarded=discarded)
