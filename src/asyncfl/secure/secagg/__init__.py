"""Secure aggregation for synchronous rounds: SecAgg (Bonawitz et al., CCS 2017) and
SecAgg+ (Bell et al., CCS 2020) as sans-I/O client/server state machines, plus an in-process
driver for simulation.

Modules: ``config`` (round parameters, stages), ``messages`` (frozen wire messages),
``client`` / ``server`` (state machines), ``graph`` (SecAgg+ graphs and parameter choice),
``driver`` (:func:`run_secagg_round`).
"""

from asyncfl.secure.secagg.client import ClientStage, SecAggClient
from asyncfl.secure.secagg.config import SecAggConfig, Stage
from asyncfl.secure.secagg.driver import SecAggResult, run_secagg_round
from asyncfl.secure.secagg.graph import SecAggPlusParams, choose_parameters
from asyncfl.secure.secagg.server import RoundFailed, SecAggServer, ServerStage

__all__ = [
    "ClientStage",
    "RoundFailed",
    "SecAggClient",
    "SecAggConfig",
    "SecAggPlusParams",
    "SecAggResult",
    "SecAggServer",
    "ServerStage",
    "Stage",
    "choose_parameters",
    "run_secagg_round",
]
