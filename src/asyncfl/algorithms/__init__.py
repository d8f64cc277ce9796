"""Aggregation algorithms: event-shaped state machines with no I/O and no clock."""

from asyncfl.algorithms.base import Aggregator, Outcome, StepInfo
from asyncfl.algorithms.factory import AlgorithmConfig, make_aggregator
from asyncfl.algorithms.fedasync import FedAsyncConfig, make_fedasync
from asyncfl.algorithms.fedavg import FedAvg, FedAvgConfig
from asyncfl.algorithms.fedbuff import FedBuff, FedBuffConfig

__all__ = [
    "Aggregator",
    "AlgorithmConfig",
    "FedAsyncConfig",
    "FedAvg",
    "FedAvgConfig",
    "FedBuff",
    "FedBuffConfig",
    "Outcome",
    "StepInfo",
    "make_aggregator",
    "make_fedasync",
]
