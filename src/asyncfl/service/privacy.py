"""User-level DP for a service task: the simulator's mechanism, built and persisted the same way.

DP-FedAvg / DP-FedBuff (McMahan et al. 2018, "Learning differentially private recurrent
language models"): each client clips its update to L2 norm C on the device (the clip norm
comes with its assignment); the aggregator sums the clipped updates, adds N(0, (zC)^2) once
per step and divides by the fixed denominator (K, or the cohort size) -- the
:class:`~asyncfl.sim.dp.DPMechanism` finalizer, built here exactly as
``asyncfl.sim.factory`` builds it. The server clips every update again before the algorithm
sees it (a no-op for an honest client): the sensitivity bound the accountant relies on must
not depend on what a client chose to send.

With ``secure_aggregation: tee`` the noise is added inside the enclave on every release
(site ``enclave``, as in simulation; :mod:`asyncfl.service.tee`); the server cannot re-clip a
masked update, so the clip is the device's (docs/security.md says what is enforced where),
and the aggregator only divides by the fixed denominator and accounts each release. The
server sees each release, so a release is noted in the ledger BEFORE it is requested
(write-ahead): after a crash between a release and its step's commit, the restarted task
accounts that release too (:func:`replay_release_notes`).

Durability: the accountant's history goes into every step's checkpoint, which the ledger
commit makes current atomically with the step, so after a restart epsilon resumes exactly
where the last committed step left it (a step that never committed spent nothing: its noised
model was never released). The budget stops the task: after each committed step, if one more
step would take epsilon above ``epsilon_budget``, the task is finished.
"""

from __future__ import annotations

import dataclasses
import json
from typing import cast

from asyncfl.algorithms.fedavg import FedAvgConfig
from asyncfl.algorithms.fedbuff import FedBuffConfig
from asyncfl.privacy.accounting import PrivacyAccountant, PrivacyAccountantStateDict
from asyncfl.service.config import TaskConfig
from asyncfl.sim.dp import DPMechanism
from asyncfl.sim.seeding import derive_seed

__all__ = [
    "accountant_json",
    "dp_noise_seed",
    "load_accountant",
    "make_task_dp",
    "replay_release_notes",
]


def make_task_dp(cfg: TaskConfig, version: int = 0, *, stream: int = 0) -> DPMechanism | None:
    """The task's DP mechanism (None without ``privacy.enabled``).

    ``version`` is the version the task (re)starts at. At 0 the seeded noise source (research
    only) is seeded as in simulation; after a restart at ``v`` it is seeded with ``v`` as well,
    so a restarted task never replays the noise of steps it already released. ``stream``
    (tee tasks: the releases already noted at ``version``) keeps a task that restarts at the
    same version after a release from replaying that release's noise.
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
    tee = cfg.secure_aggregation.mode == "tee"
    if cfg.secure_aggregation.mode in ("secagg", "secagg+") and isinstance(alg, FedAvgConfig):
        # Distributed noise (asyncfl.service.secagg_task): every device adds its share before
        # masking; no round unmasks fewer than min_updates inputs, as in simulation.
        return DPMechanism(pcfg, dp_noise_seed(cfg, version), "clients", alg.min_updates)
    return DPMechanism(
        pcfg, dp_noise_seed(cfg, version, stream), site="enclave" if tee else "server"
    )


def dp_noise_seed(cfg: TaskConfig, version: int, noise_stream: int = 0) -> int:
    """Seed of the research-only ``seeded`` noise source (the aggregator's, or the enclave's
    for tee tasks) of a task (re)starting at ``version`` (see :func:`make_task_dp`)."""
    if noise_stream:
        return derive_seed(cfg.seed, "dp_noise", version, noise_stream)
    if version == 0:
        return derive_seed(cfg.seed, "dp_noise")  # as the simulator seeds it
    return derive_seed(cfg.seed, "dp_noise", version)


def replay_release_notes(dp: DPMechanism, notes: int) -> None:
    """Account ``notes`` releases noted at the checkpoint's version but never committed.

    Each note was made durable before its release was requested; the server may have seen
    the noised sum before it crashed, so it is spent. (A note whose release the enclave then
    refused is counted too: conservative, and only after a crash.) They are recorded even past
    the budget (the spend happened; the task is then finished), through an unbudgeted copy,
    since the accountant itself refuses to record a step above its budget.
    """
    if notes < 1:
        return
    unbudgeted = PrivacyAccountant(dataclasses.replace(dp.cfg, epsilon_budget=None))
    unbudgeted.load_state_dict(dp.accountant.state_dict())
    unbudgeted.record_step(notes)
    dp.accountant.load_state_dict(unbudgeted.state_dict())


def accountant_json(dp: DPMechanism) -> str:
    return json.dumps(dp.accountant.state_dict(), sort_keys=True)


def load_accountant(dp: DPMechanism, text: str) -> None:
    dp.accountant.load_state_dict(cast(PrivacyAccountantStateDict, json.loads(text)))
