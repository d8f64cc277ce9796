"""Build an aggregator from its config."""

from __future__ import annotations

from asyncfl.algorithms.base import Aggregator, Finalizer
from asyncfl.algorithms.fedasync import FedAsyncConfig, make_fedasync
from asyncfl.algorithms.fedavg import FedAvg, FedAvgConfig
from asyncfl.algorithms.fedbuff import FedBuff, FedBuffConfig
from asyncfl.core.server_opt import ServerOptimizer
from asyncfl.core.update import FloatVector

__all__ = ["AlgorithmConfig", "make_aggregator"]

AlgorithmConfig = FedAvgConfig | FedBuffConfig | FedAsyncConfig


def make_aggregator(
    cfg: AlgorithmConfig,
    params: FloatVector,
    optimizer: ServerOptimizer,
    finalize: Finalizer | None = None,
) -> Aggregator:
    if isinstance(cfg, FedAvgConfig):
        return FedAvg(cfg, params, optimizer, finalize)
    if isinstance(cfg, FedBuffConfig):
        return FedBuff(cfg, params, optimizer, finalize=finalize)
    return make_fedasync(cfg, params, optimizer, finalize)
