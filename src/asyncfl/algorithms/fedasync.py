"""FedAsync (Xie, Koyejo & Gupta 2019, "Asynchronous Federated Optimization", Alg. 1).

Every arriving update is applied at once (K = 1) with mixing rate
``alpha_t = alpha * s(staleness)``. The paper mixes models,
``x <- (1 - alpha_t) x + alpha_t x_new`` with ``x_new = x_base - delta``; we apply the delta
as a pseudo-gradient, ``x <- x - alpha_t delta`` (server SGD, lr 1), which is the same update
when the staleness is 0 and, unlike model mixing, needs no copy of the stale base model on
the server. This is how FLSim and the FedBuff paper run FedAsync as a baseline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from asyncfl.algorithms.base import Finalizer
from asyncfl.algorithms.fedbuff import FedBuff, FedBuffConfig
from asyncfl.core.server_opt import ServerOptimizer
from asyncfl.core.update import FloatVector
from asyncfl.core.weights import StalenessConfig
from asyncfl.errors import ConfigProblem

__all__ = ["FedAsyncConfig", "make_fedasync"]


@dataclass(frozen=True)
class FedAsyncConfig:
    name: Literal["fedasync"] = "fedasync"
    """Selects FedAsync."""
    concurrency: int = 100
    """Clients training at any time."""
    mixing_rate: float = 0.6
    """alpha in (0, 1]."""
    staleness: StalenessConfig = field(default_factory=StalenessConfig)
    """Staleness function s(t) multiplying the mixing rate."""
    max_staleness: int | None = None
    """Reject updates staler than this; null accepts all."""

    def validate(self) -> list[ConfigProblem]:
        out: list[ConfigProblem] = []
        if not 0.0 < self.mixing_rate <= 1.0:
            out.append(ConfigProblem("mixing_rate", self.mixing_rate, "a number in (0, 1]"))
        out += self.as_fedbuff().validate()
        return out

    def as_fedbuff(self) -> FedBuffConfig:
        return FedBuffConfig(
            concurrency=self.concurrency,
            buffer_size=1,
            staleness=self.staleness,
            max_staleness=self.max_staleness,
            example_weighting="equal",
        )


def make_fedasync(
    cfg: FedAsyncConfig,
    params: FloatVector,
    optimizer: ServerOptimizer,
    finalize: Finalizer | None = None,
) -> FedBuff:
    return FedBuff(
        cfg.as_fedbuff(), params, optimizer, mixing_rate=cfg.mixing_rate, finalize=finalize
    )
