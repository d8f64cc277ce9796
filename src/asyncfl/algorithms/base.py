"""What every aggregation algorithm shares: the event interface and the buffered weighted mean.

Algorithms are event-shaped state machines: the driver (simulator or service) hands them one
update at a time through ``on_update`` and they answer with an :class:`Outcome`. They never
read a clock and never hold hidden "current round" state: staleness and round membership are
derived from the update's ``base_version`` against the server's ``version``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from asyncfl.core.server_opt import ServerOptimizer
from asyncfl.core.update import FloatVector, Update
from asyncfl.core.weights import WeightedSum
from asyncfl.errors import UpdateRejected

__all__ = ["Aggregator", "Finalizer", "Outcome", "StepInfo", "weighted_mean"]

FlushStatus = Literal["stepped", "zero_weight"]


class Finalizer(Protocol):
    """Turns a buffer's weighted sum into the pseudo-gradient of one server step.

    The default is the weighted mean; differential privacy replaces it with "add noise
    calibrated to the clip norm, divide by a fixed denominator" (``asyncfl.privacy``).
    """

    def __call__(
        self, weighted_sum: FloatVector, example_total: float, count: int
    ) -> FloatVector: ...


def weighted_mean(weighted_sum: FloatVector, example_total: float, count: int) -> FloatVector:
    del count
    return (weighted_sum / np.float32(example_total)).astype(np.float32, copy=False)


@dataclass(frozen=True)
class StepInfo:
    """What one server step did."""

    version: int
    """The new server version (the version before the step + 1)."""
    num_updates: int
    total_weight: float
    pseudo_grad_norm: float


@dataclass(frozen=True)
class Outcome:
    """The answer to one event. ``accepted`` False means state is unchanged."""

    accepted: bool
    staleness: int = 0
    weight: float = 0.0
    reason: str | None = None
    """Stable code of the rejection (``too_stale``, ``late``, ``bad_shape``, ...)."""
    detail: str | None = None
    step: StepInfo | None = None
    """Set when this event triggered a server step."""
    discarded: int = 0
    """Buffered updates thrown away by this event (failed round, zero total weight)."""


class Aggregator:
    """Server model + buffer + server optimizer; the part FedAvg, FedBuff and FedAsync share.

    The buffer holds ``sum_i w_i * delta_i`` in one model-sized vector (``WeightedSum``), and
    the example weights ``e_i`` separately; a flush applies the pseudo-gradient
    ``g = sum_i w_i delta_i / sum_i e_i`` through the server optimizer, where ``w_i`` is the
    example weight times any staleness factor. With all staleness factors 1 this is the
    example-weighted mean of the deltas (FedAvg, McMahan et al. 2017, Alg. 1).
    """

    def __init__(
        self,
        params: FloatVector,
        optimizer: ServerOptimizer,
        finalize: Finalizer | None = None,
    ) -> None:
        if params.dtype != np.float32 or params.ndim != 1:
            raise ValueError(
                f"params must be a 1-D float32 vector, got {params.dtype} {params.shape}"
            )
        self._params = params.copy()
        self._optimizer = optimizer
        self._version = 0
        self._buffer = WeightedSum(params.shape[0])
        self._example_total = 0.0
        self._finalize: Finalizer | None = finalize
        self.rejected: dict[str, int] = {}
        """Count of rejected updates per reason code."""

    @property
    def params(self) -> FloatVector:
        """The current global model (a read-only view; copy before changing it)."""
        view = self._params.view()
        view.flags.writeable = False
        return view

    @property
    def version(self) -> int:
        return self._version

    def resume_at(self, version: int) -> None:
        """Continue from a checkpoint of ``version`` (the aggregator was built from its
        params). Only a fresh aggregator with an empty buffer may resume; the caller replays
        the updates buffered after that checkpoint through ``on_update``."""
        if version < 0:
            raise ValueError(f"version {version} must be >= 0")
        if self._version != 0 or self._buffer.count:
            raise ValueError("resume_at needs a fresh aggregator (version 0, empty buffer)")
        self._version = version

    @property
    def dim(self) -> int:
        return int(self._params.shape[0])

    @property
    def buffered(self) -> int:
        return self._buffer.count

    def _reject(self, reason: str, detail: str, staleness: int = 0) -> Outcome:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        return Outcome(accepted=False, reason=reason, detail=detail, staleness=staleness)

    def _check(self, update: Update) -> Outcome | None:
        try:
            update.validate(self.dim, self._version)
        except UpdateRejected as exc:
            return self._reject(exc.reason, exc.detail)
        return None

    def _add(self, update: Update, weight: float, example_weight: float) -> None:
        if not (math.isfinite(weight) and weight >= 0.0):
            raise ValueError(f"weight {weight} must be finite and >= 0")
        self._buffer.add(update.delta, weight)
        self._example_total += example_weight

    def _discard(self) -> int:
        n = self._buffer.count
        self._buffer.reset()
        self._example_total = 0.0
        return n

    def _flush(self) -> tuple[StepInfo | None, int]:
        """Apply the buffer as one server step, or discard it if its total weight is zero.

        Zero total example weight (every buffered update had ``num_examples == 0`` under a
        data-size weighting) is defined as *no step*: the buffer is dropped and the version
        stays, instead of silently stepping with zeros.
        """
        count = self._buffer.count
        if count == 0:
            return None, 0
        if self._example_total <= 0.0:
            return None, self._discard()
        info = self._step(self._buffer.sum, self._example_total, count)
        self._discard()
        return info, 0

    def _step(self, weighted_sum: FloatVector, example_total: float, count: int) -> StepInfo:
        finalize = self._finalize or weighted_mean
        pseudo_grad = finalize(weighted_sum, example_total, count)
        self._params = self._optimizer.step(self._params, pseudo_grad)
        self._version += 1
        return StepInfo(
            version=self._version,
            num_updates=count,
            total_weight=example_total,
            # A plain reduction, not BLAS: np.linalg.norm took ~10 ms per step with two BLAS
            # threads on busy cores.
            pseudo_grad_norm=math.sqrt(float(np.square(pseudo_grad, dtype=np.float64).sum())),
        )

    def on_aggregate(
        self, base_version: int, weighted_sum: FloatVector, example_total: float, count: int
    ) -> Outcome:
        """Step with a sum computed elsewhere (a secure-sum protocol): the aggregator never
        sees the individual updates, only ``sum_i w_i delta_i`` of ``count`` of them.

        Only a sum computed from the current version is accepted; the buffer must be empty
        (secure and plaintext updates are never mixed in one step).
        """
        if base_version != self._version:
            return self._reject(
                "late", f"aggregate of round {base_version}, current version {self._version}"
            )
        if self._buffer.count:
            return self._reject("buffer_not_empty", "plaintext updates are already buffered")
        if weighted_sum.shape != (self.dim,) or weighted_sum.dtype != np.float32:
            return self._reject(
                "bad_shape",
                f"aggregate {weighted_sum.dtype} {weighted_sum.shape}, model {self.dim}",
            )
        if not np.isfinite(weighted_sum).all():
            return self._reject("not_finite", "aggregate contains NaN or Inf")
        if count < 1 or not example_total > 0.0:
            return Outcome(accepted=True, reason="zero_weight", discarded=max(count, 0))
        return Outcome(accepted=True, step=self._step(weighted_sum, example_total, count))

    def on_update(self, update: Update) -> Outcome:  # pragma: no cover - abstract
        raise NotImplementedError
