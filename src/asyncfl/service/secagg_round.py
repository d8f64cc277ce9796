"""One SecAgg / SecAgg+ round of a FedAvg task, server side, without I/O.

:class:`SecAggRound` drives the sans-I/O :class:`~asyncfl.secure.secagg.SecAggServer`
(Bonawitz et al., CCS 2017; Bell et al., CCS 2020 for SecAgg+) through one FedAvg round of
the service. Its phases and who moves them::

    COLLECTING --advance--> ADVERTISE_KEYS --advance--> SHARE_KEYS --advance-->
    MASKED_INPUT --advance--> UNMASKING --advance--> UNMASKED --applied()--> APPLIED
         (any advance may end in FAILED: too few clients, or below the threshold)

* COLLECTING: the round's selected clients (FedAvg's over-selected cohort) train and
  :meth:`join` with their integer example weight. The first ``cohort_size`` joins fix the
  participants (FedAvg's "first C close the round"); the caller may close the collection
  earlier (the round deadline, or every selected client gone) with at least
  ``min_joined``. Later joins are ``late``.
* The four protocol stages: each stage's messages arrive through :meth:`receive`; a stage
  closes (:meth:`advance`) when every client it expects has sent, or at its deadline
  (``stage_timeout_s`` after it opened) with whoever did: clients that vanish are the
  protocol's dropouts. Before unmasking, a round holding fewer than ``min_inputs`` masked
  inputs fails, so no released sum has fewer inputs (distributed DP relies on it).
* UNMASKED: the ring sum is decoded (fixed point -> float, times the total weight) into the
  weighted sum the aggregator steps with, exactly as the simulator's
  :class:`~asyncfl.sim.secure_rounds.SecureRoundRunner` does. The masked inputs are dropped.

Every method validates before it mutates: a refused message (wrong stage, wrong session,
excluded sender, a different message for a stage already answered, or anything the
protocol machine refuses) raises :class:`~asyncfl.service.errors.ServiceError` and leaves the
round as it was. A message identical to one already received (a client retrying after a lost
answer) is accepted as a no-op. Time is passed in (``now``, monotonic seconds); nothing here
reads a clock, logs, or touches the network.

What the round holds: public keys, client-to-client ciphertexts it cannot read, masked
vectors, Shamir shares, and the final sum. Never an individual unmasked update.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Literal

import numpy as np

from asyncfl.algorithms.fedavg import FedAvgConfig
from asyncfl.core.update import FloatVector
from asyncfl.errors import ConfigError, ProtocolError
from asyncfl.secure.fixedpoint import FixedPointCodec
from asyncfl.secure.secagg import (
    RoundFailed,
    SecAggConfig,
    SecAggServer,
    Stage,
    choose_parameters,
)
from asyncfl.secure.secagg.config import SESSION_BYTES
from asyncfl.secure.secagg.messages import (
    AdvertiseKeys,
    ClientMessage,
    KeyBroadcast,
    MaskedInput,
    ServerMessage,
    ShareBroadcast,
    ShareKeys,
    UnmaskRequest,
)
from asyncfl.service.config import TaskConfig
from asyncfl.service.errors import ServiceError

__all__ = [
    "MAX_CLIENT_ID",
    "Phase",
    "Reply",
    "RoundDone",
    "RoundInfo",
    "SecAggParams",
    "SecAggRound",
    "round_config",
    "stage_of",
]

SecAggMode = Literal["secagg", "secagg+"]
MAX_CLIENT_ID = 2**63 - 1
"""SecAgg ids are Shamir evaluation points ``id + 1`` and must stay below 2^63."""


@dataclass(frozen=True)
class SecAggParams:
    """The public parameters of a task's rounds: what the assignment tells every device.

    A device derives each round's :class:`SecAggConfig` (threshold, graph) from these and
    the round's participant list itself (:func:`round_config`), so a server cannot hand it a
    lower threshold than the task's published config implies.
    """

    mode: SecAggMode
    clip: float
    frac_bits: int
    ring_bits: int
    threshold_fraction: float
    corrupt_fraction: float
    dropout_fraction: float
    stage_timeout_s: float
    min_inputs: int = 2
    """The server never unmasks a sum of fewer inputs (with distributed DP: ``min_updates``)."""
    noise_std: float = 0.0
    """Distributed DP: std of the Gaussian share each device adds to its clipped update."""
    max_weight: int = 1
    """Largest integer example weight of one input: the cohort's weighted sum cannot wrap."""

    @property
    def codec(self) -> FixedPointCodec:
        return FixedPointCodec(clip=self.clip, frac_bits=self.frac_bits, ring_bits=self.ring_bits)

    @classmethod
    def for_task(
        cls, cfg: TaskConfig, dp_min_survivors: int | None, noise_std: float
    ) -> SecAggParams:
        """The parameters of task ``cfg`` (``secure_aggregation`` secagg or secagg+, FedAvg)."""
        sa, alg = cfg.secure_aggregation, cfg.algorithm
        if sa.mode not in ("secagg", "secagg+") or not isinstance(alg, FedAvgConfig):
            raise ValueError(f"task {cfg.id!r} is not a FedAvg task with secagg/secagg+")
        codec = FixedPointCodec(clip=sa.clip, frac_bits=sa.frac_bits, ring_bits=sa.ring_bits)
        return cls(
            mode=sa.mode,
            clip=sa.clip,
            frac_bits=sa.frac_bits,
            ring_bits=sa.ring_bits,
            threshold_fraction=sa.threshold_fraction,
            corrupt_fraction=sa.corrupt_fraction,
            dropout_fraction=sa.dropout_fraction,
            stage_timeout_s=cfg.secagg_stage_timeout_s,
            # As the simulator: a "sum" of one input is that input; with distributed DP noise
            # no released sum may hold fewer than min_updates noise shares.
            min_inputs=max(2, dp_min_survivors or 0),
            noise_std=noise_std,
            max_weight=max(1, codec.max_total_weight() // alg.selection_size),
        )


def round_config(
    params: SecAggParams,
    dim: int,
    participants: tuple[int, ...],
    session_id: bytes,
    graph_seed: int,
) -> SecAggConfig:
    """The round's protocol config, as the simulator builds it: SecAgg with threshold
    ``floor(n * threshold_fraction) + 1``, or SecAgg+ on a Harary graph whose degree and
    threshold come from the corrupt and dropout fractions (complete below n = 3). Server and
    devices both call this; ``graph_seed`` only permutes the SecAgg+ graph."""
    n = len(participants)
    if params.mode == "secagg+" and n >= 3:
        sp = choose_parameters(n, params.corrupt_fraction, params.dropout_fraction)
        rng = np.random.default_rng(graph_seed)
        return SecAggConfig.secagg_plus(
            participants, dim, sp, rng, params.ring_bits, session_id=session_id
        )
    t = min(n, int(n * params.threshold_fraction) + 1)
    return SecAggConfig.secagg(participants, dim, t, params.ring_bits, session_id=session_id)


class Phase(Enum):
    COLLECTING = "collecting"
    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    UNMASKING = "unmasking"
    UNMASKED = "unmasked"
    APPLIED = "applied"
    FAILED = "failed"


_STAGE_PHASE = {
    Stage.ADVERTISE_KEYS: Phase.ADVERTISE_KEYS,
    Stage.SHARE_KEYS: Phase.SHARE_KEYS,
    Stage.MASKED_INPUT: Phase.MASKED_INPUT,
    Stage.UNMASKING: Phase.UNMASKING,
}
_PHASE_STAGE = {p: s for s, p in _STAGE_PHASE.items()}
_ORDER = list(Phase)


def stage_of(msg: ClientMessage) -> Stage:
    if isinstance(msg, AdvertiseKeys):
        return Stage.ADVERTISE_KEYS
    if isinstance(msg, ShareKeys):
        return Stage.SHARE_KEYS
    if isinstance(msg, MaskedInput):
        return Stage.MASKED_INPUT
    return Stage.UNMASKING


@dataclass(frozen=True)
class RoundInfo:
    """The answer to a join once the participants are fixed."""

    session_id: bytes
    version: int
    participants: tuple[int, ...]
    graph_seed: int
    weight: int
    """The integer weight this client multiplies its fixed-point update by."""


@dataclass(frozen=True)
class RoundDone:
    """The round's sum was applied: the model moved to ``version``."""

    version: int
    survivors: int


Reply = RoundInfo | KeyBroadcast | ShareBroadcast | UnmaskRequest | RoundDone
"""What a client receives next; ``None`` from :meth:`SecAggRound.reply` means "not yet"."""


class SecAggRound:
    """Server side of one round of model version ``version``; see the module docstring."""

    def __init__(
        self,
        params: SecAggParams,
        *,
        dim: int,
        version: int,
        cohort_size: int,
        min_joined: int,
        entropy: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if cohort_size < 1 or dim < 1:
            raise ValueError(f"cohort_size={cohort_size} and dim={dim} must be >= 1")
        self.params = params
        self.dim = dim
        self.version = version
        self.cohort_size = cohort_size
        # A round needs two inputs to hide any of them, min_updates (FedAvg), and enough
        # inputs to pass the unmasking floor.
        self.min_joined = max(2, min_joined, params.min_inputs)
        self._entropy = entropy
        self.phase = Phase.COLLECTING
        self.weights: dict[int, int] = {}
        self.num_examples: dict[int, int] = {}
        self.participants: tuple[int, ...] = ()
        self.session_id = b""
        self.graph_seed = 0
        self.config: SecAggConfig | None = None
        self._server: SecAggServer | None = None
        self._close_requested = False
        self.stage_deadline = math.inf
        self._expected: dict[Stage, frozenset[int]] = {}
        self._digests: dict[Stage, dict[int, bytes]] = {s: {} for s in Stage}
        self._outbox: dict[Stage, dict[int, ServerMessage]] = {}
        self.failure: str | None = None
        self.survivors: frozenset[int] = frozenset()
        self.weighted_sum: FloatVector | None = None
        self.total_weight = 0
        self.applied_version: int | None = None
        self.dropouts: dict[Stage, int] = {}
        """Clients a stage expected that did not send (protocol dropouts), per stage."""

    # -- state --------------------------------------------------------------------------------
    @property
    def in_protocol(self) -> bool:
        return self.phase in _PHASE_STAGE

    @property
    def terminal(self) -> bool:
        return self.phase in (Phase.APPLIED, Phase.FAILED)

    def closable(self, now: float) -> bool:
        """True when :meth:`advance` has something to do now."""
        if self.phase is Phase.COLLECTING:
            return len(self.weights) >= self.cohort_size or self._close_requested
        if self.in_protocol:
            stage = _PHASE_STAGE[self.phase]
            return now >= self.stage_deadline or self._expected[stage] <= set(self._digests[stage])
        return False

    def received(self, stage: Stage) -> frozenset[int]:
        """The clients whose message of ``stage`` the round holds."""
        return frozenset(self._digests[stage])

    def request_close(self) -> None:
        """Close the collection at the next :meth:`advance` (round deadline, clients gone)."""
        if self.phase is Phase.COLLECTING:
            self._close_requested = True

    # -- client events ------------------------------------------------------------------------
    def join(self, client: int, num_examples: int, weight: int) -> None:
        """Client ``client`` finished training and takes part with integer ``weight``."""
        if not 0 <= client <= MAX_CLIENT_ID:
            raise ServiceError("ineligible", f"client id {client} is not a SecAgg id")
        known = self.weights.get(client)
        if known is not None:
            if known != weight:
                raise ServiceError("duplicate", f"client {client} joined with weight {known}")
            return
        if self.phase is not Phase.COLLECTING:
            if self.phase is Phase.FAILED:
                raise ServiceError("round_failed", self.failure or "")
            raise ServiceError("late", f"round {self.version} has its participants")
        if len(self.weights) >= self.cohort_size:  # full; the round starts at the next advance
            raise ServiceError("late", f"round {self.version} has {self.cohort_size} clients")
        if not 1 <= weight <= self.params.max_weight:
            raise ServiceError(
                "bad_weight", f"weight {weight} not in [1, {self.params.max_weight}]"
            )
        self.weights[client] = weight
        self.num_examples[client] = num_examples

    def receive(self, client: int, msg: ClientMessage, digest: bytes) -> None:
        """Record ``client``'s message of the current stage (``digest`` identifies it)."""
        stage = stage_of(msg)
        if self.phase is Phase.FAILED:
            raise ServiceError("round_failed", self.failure or "")
        if msg.sender != client:
            raise ServiceError("protocol", f"message of {msg.sender} sent by {client}")
        if msg.session_id != self.session_id or self.config is None:
            raise ServiceError("round_failed", "message for another session")
        seen = self._digests[stage].get(client)
        if seen is not None:
            if seen != digest:
                raise ServiceError("duplicate", f"client {client}: another {stage.name}")
            return  # a retry of what we already hold
        if self.phase is not _STAGE_PHASE[stage]:
            if _ORDER.index(_STAGE_PHASE[stage]) < _ORDER.index(self.phase):
                raise ServiceError("late", f"{stage.name} of client {client} after it closed")
            raise ServiceError("protocol", f"{stage.name} in phase {self.phase.value}")
        if client not in self._expected[stage]:
            raise ServiceError("late", f"client {client} is not part of stage {stage.name}")
        assert self._server is not None
        try:
            self._server.receive(msg)
        except ProtocolError as exc:
            raise ServiceError("protocol", str(exc)) from None
        self._digests[stage][client] = digest

    def reply(self, client: int, sent: Stage | None) -> Reply | None:
        """What ``client``, having sent its message of stage ``sent`` (None: its join), gets
        next; ``None`` while that stage is open. Raises ``late`` if the round went on
        without it, ``round_failed`` if the round failed."""
        if self.phase is Phase.FAILED:
            raise ServiceError("round_failed", self.failure or "")
        if sent is None:
            if client not in self.weights:
                raise ServiceError("late", f"client {client} did not join round {self.version}")
            if self.phase is Phase.COLLECTING:
                return None
            return RoundInfo(
                self.session_id,
                self.version,
                self.participants,
                self.graph_seed,
                self.weights[client],
            )
        phase = _STAGE_PHASE[sent]
        expected = self._expected.get(sent, frozenset())
        if client not in expected:
            if self.phase is Phase.COLLECTING or _ORDER.index(self.phase) < _ORDER.index(phase):
                raise ServiceError("protocol", f"{sent.name} has not started")
            raise ServiceError("late", f"client {client} is not part of stage {sent.name}")
        if self.phase is phase or (sent is Stage.UNMASKING and self.phase is Phase.UNMASKED):
            return None
        if sent is Stage.UNMASKING:
            assert self.applied_version is not None
            return RoundDone(self.applied_version, len(self.survivors))
        out = self._outbox[sent].get(client)
        if out is None:
            raise ServiceError("late", f"the round went on without client {client}")
        return out

    # -- transitions --------------------------------------------------------------------------
    def _fail(self, reason: str) -> None:
        self.phase = Phase.FAILED
        self.failure = reason
        self._server = None  # drop masked inputs and shares: nothing partial survives
        self._outbox.clear()
        self.weighted_sum = None

    def fail(self, reason: str) -> None:
        """Abandon the round (e.g. its sum could not be applied)."""
        if not self.terminal:
            self._fail(reason)

    def advance(self, now: float) -> None:
        """Close the collection or the current stage; may end in FAILED (never raises for
        a failed round: the reason is in :attr:`failure`)."""
        if self.phase is Phase.COLLECTING:
            self._start(now)
        elif self.in_protocol:
            self._close_stage(now)
        else:
            raise ProtocolError(f"round {self.version}: nothing to advance in {self.phase.value}")

    def _start(self, now: float) -> None:
        if len(self.weights) < self.min_joined:
            self._fail(f"{len(self.weights)} clients joined, the round needs {self.min_joined}")
            return
        # Over-selection: the first cohort_size joins are the participants, as FedAvg's
        # first C updates; join() refuses more once the round is past COLLECTING.
        self.participants = tuple(sorted(self.weights))
        self.session_id = self._entropy(SESSION_BYTES)
        self.graph_seed = int.from_bytes(self._entropy(8), "big")
        try:
            self.config = round_config(
                self.params, self.dim, self.participants, self.session_id, self.graph_seed
            )
        except ConfigError as exc:  # e.g. SecAgg+ cannot tolerate the dropout fraction
            self._fail(f"no protocol config for {len(self.participants)} clients: {exc}")
            return
        self._server = SecAggServer(self.config)
        self._open(Stage.ADVERTISE_KEYS, frozenset(self.participants), now)

    def _open(self, stage: Stage, expected: frozenset[int], now: float) -> None:
        self.phase = _STAGE_PHASE[stage]
        self._expected[stage] = expected
        self.stage_deadline = now + self.params.stage_timeout_s

    def _close_stage(self, now: float) -> None:
        assert self._server is not None
        stage = _PHASE_STAGE[self.phase]
        self.dropouts[stage] = len(self._expected[stage] - set(self._digests[stage]))
        if stage is Stage.MASKED_INPUT and len(self._server.survivors) < self.params.min_inputs:
            # Abort before anyone reveals shares: no sum of fewer inputs is ever unmasked.
            self._fail(
                f"{len(self._server.survivors)} masked inputs, fewer than {self.params.min_inputs}"
            )
            return
        try:
            replies = self._server.advance()
        except RoundFailed as exc:
            self._fail(str(exc))
            return
        if stage is Stage.UNMASKING:
            self._decode(self._server)
            return
        nxt = Stage(stage.value + 1)
        self._outbox[stage] = {r.recipient: r for r in replies}
        self._open(nxt, frozenset(self._outbox[stage]), now)

    def _decode(self, server: SecAggServer) -> None:
        """Ring sum -> fixed-point decode -> the weighted float sum (as the simulator)."""
        survivors = server.survivors
        total = sum(self.weights[u] for u in survivors)
        codec = self.params.codec
        mean = codec.decode_sum(server.result, total)
        self.weighted_sum = (mean * np.float32(total)).astype(np.float32)
        self.total_weight = total
        self.survivors = survivors
        self._server = None  # the masked inputs are no longer needed
        self._outbox.clear()
        self.phase = Phase.UNMASKED
        self.stage_deadline = math.inf

    def applied(self, version: int) -> None:
        """The aggregator stepped with this round's sum: the model is now ``version``."""
        if self.phase is not Phase.UNMASKED:
            raise ProtocolError(f"round {self.version} is {self.phase.value}, not unmasked")
        self.applied_version = version
        self.weighted_sum = None
        self.phase = Phase.APPLIED
