"""User-level DP for a service task: the simulator's mechanism, built and persisted the same way.

DP-FedAvg / DP-FedBuff (McMahan et al. 2018, "Learning differentially private recurrent
language models"): each client clips its update to L2 norm C on the device (the clip norm
comes with its assignment); the aggregator sums the clipped updates, adds N(0, (zC)^2) once
per step and divides by the fixed denominator (K, or the cohort size) -- the
:class:`~asyncfl.sim.dp.DPMechanism` finalizer, built here exactly as
``asyncfl.sim.factory`` builds it. The server clips every update again before the algorithm
sees it (a no-op for an honest client): the sensitivity bound the accountant relies on must
not depend on what a client chose to send.

Durability: the accountant's history goes into every step's checkpoint, which the ledger
commit makes current atomically with the step, so after a restart epsilon resumes exactly
where the last committed step left it (a step that never committed spent nothing: its noised
model was never released). The budget stops the task: after each committed step, if one more
step would take epsilon above ``epsilon_budget``, the task is finished.
"""

from __future__ import annotations

import json
from typing import cast

from asyncfl.algorithms.fedavg import FedAvgConfig
from asyncfl.algorithms.fedbuff import FedBuffConfig
from asyncfl.privacy.accounting import PrivacyAccountantStateDict
from asyncfl.service.config import TaskConfig
from asyncfl.sim.dp import DPMechanism
from asyncfl.sim.seeding import derive_seed

__all__ = ["accountant_json", "load_accountant", "make_task_dp"]


def make_task_dp(cfg: TaskConfig, version: int = 0) -> DPMechanism | None:
    """The task's DP mechanism (None without ``privacy.enabled``).

    ``version`` is the version the task (re)starts at. At 0 the seeded noise source (research
    only) is seeded as in simulation; after a restart at ``v`` it is seeded with ``v`` as well,
    so a restarted task never replays the noise of steps it already released.
    """
    if not cfg.privacy.enabled:
        return None
    if cfg.population is None:  # TaskConfig.validate refuses this
        raise ValueError(f"task {cfg.id!r}: privacy.enabled needs population")
    alg = cfg.algorithm
    denominator = (
        alg.cohort_size
        if isinstance(alg, FedAvgConfig)
        else (alg.buffer_size if isinstance(alg, FedBuffConfig) else 1)
    )
    pcfg = cfg.privacy.privacy_config(
        denominator, cfg.population, sync=isinstance(alg, FedAvgConfig)
    )
    seed = (
        derive_seed(cfg.seed, "dp_noise")
        if version == 0
        else derive_seed(cfg.seed, "dp_noise", version)
    )
    return DPMechanism(pcfg, seed)


def accountant_json(dp: DPMechanism) -> str:
    return json.dumps(dp.accountant.state_dict(), sort_keys=True)


def load_accountant(dp: DPMechanism, text: str) -> None:
    dp.accountant.load_state_dict(cast(PrivacyAccountantStateDict, json.loads(text)))
