"""The SecAgg rounds of one FedAvg task in the service (``secure_aggregation`` secagg/secagg+).

The selection is FedAvg's (``selector.Slots``: ``ceil(C (1 + o))`` leases per round, the
round deadline); what replaces the upload is the protocol, driven by one
:class:`~asyncfl.service.secagg_round.SecAggRound` per round:

1. a selected client trains, then *joins* with its example count; its lease's slot is
   released (its training is over). The first C joins fix the participants; the round
   deadline, or every selected client gone, closes the collection with at least
   ``max(2, min_updates)`` (else the round fails and the next check-in opens a new one);
2. the four protocol stages run through :meth:`SecAggTask.receive`, each closed when every
   client it expects has answered or ``secagg_stage_timeout_s`` after it opened;
3. the decoded weighted sum goes to the aggregator (``Aggregator.on_aggregate`` with the
   task's DP finalizer, as the simulator), and ``TaskRuntime.apply_aggregate`` commits the
   step, the survivors' ledger rows (no deltas) and the round's record in one transaction.

Every call answers with the client's next server message, waiting up to ``_LONG_POLL_S``
for its stage to close (long poll), else ``None`` (the client polls again). Stage closes
and the step run in a task of their own (:meth:`_close_loop`), never in a client's handler,
so a client hanging up cannot interrupt a commit.

Durability: a round in flight lives in memory only. A restart abandons it (its masked
inputs are useless without the unmasking stage, and its clients' keys are gone with them):
clients polling the old session get ``round_failed`` and check in again, and the round
restarts at the same model version. An applied round is in the ledger exactly once (its
step's transaction; ``UNIQUE(task, version)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import numpy as np

from asyncfl.algorithms.fedavg import FedAvgConfig
from asyncfl.core.weights import example_weight
from asyncfl.secure.secagg import Stage
from asyncfl.secure.secagg.messages import ClientMessage
from asyncfl.service.auth import Lease, Secret
from asyncfl.service.config import TaskConfig
from asyncfl.service.errors import ServiceError
from asyncfl.service.secagg_round import Phase, Reply, SecAggParams, SecAggRound, stage_of
from asyncfl.service.selector import Slots
from asyncfl.service.store import LedgerRow, SecureRoundRow
from asyncfl.service.task import TaskRuntime

__all__ = ["SecAggTask"]

log = logging.getLogger("asyncfl.service.secagg")

_LONG_POLL_S = 5.0
_KEEP_ROUNDS = 4
# As for uploads (coordinator): a join is accepted this long past the lease timeout.
_LEASE_GRACE_S = 30.0


class SecAggTask:
    """The current SecAgg round of one task and the calls that drive it."""

    def __init__(
        self,
        cfg: TaskConfig,
        runtime: TaskRuntime,
        slots: Slots,
        task_lock: asyncio.Lock,
        secret: Secret,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        entropy: Callable[[int], bytes] = os.urandom,
    ) -> None:
        alg = cfg.algorithm
        if not isinstance(alg, FedAvgConfig):  # TaskConfig.validate refuses this
            raise ValueError(f"task {cfg.id!r}: secagg needs algorithm fedavg")
        self.cfg = cfg
        self.alg = alg
        self.runtime = runtime
        self.slots = slots
        self.task_lock = task_lock
        self.secret = secret
        self._clock = clock
        self._wall = wall_clock
        self._entropy = entropy
        dp = runtime.dp
        min_survivors = None if dp is None else dp.min_survivors
        noise_std = 0.0
        if dp is not None:
            # Each device's share of N(0, (z C)^2): variance / m, so any released sum (of at
            # least m inputs) carries the calibrated noise (asyncfl.sim.dp, site "clients").
            noise_std = dp.cfg.noise_multiplier * dp.clip_norm / math.sqrt(dp.min_survivors)
        self.params = SecAggParams.for_task(cfg, min_survivors, noise_std)
        self._rounds: deque[tuple[SecAggRound, dict[str, int]]] = deque(maxlen=_KEEP_ROUNDS)
        """The latest rounds (newest last), each with its joins' lease id -> client: a client
        whose last answer was lost still learns how its (finished) round ended."""
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._closer: asyncio.Task[None] | None = None
        self._closed = False
        self.rounds_applied = 0
        self.rounds_failed = 0
        self.dropouts: Counter[str] = Counter()
        """Participants that missed each stage's deadline, by stage name (all rounds)."""

    # -- checks -----------------------------------------------------------------------------
    def _lease(self, client: int, lease_id: str) -> Lease:
        lease = self.secret.verify_lease(lease_id)
        if lease is None or lease.client_id != client or lease.task_id != self.cfg.id:
            raise ServiceError("bad_lease", f"client {client} lease {lease_id[:80]!r}")
        return lease

    def _check_running(self) -> None:
        rt = self.runtime
        if rt.finished:
            if rt.budget_spent:
                raise ServiceError("privacy_budget_spent", self.cfg.id)
            raise ServiceError("task_finished", f"task {self.cfg.id} at {rt.version}")

    @property
    def current(self) -> SecAggRound | None:
        """The newest round (collecting, running, or ended)."""
        return self._rounds[-1][0] if self._rounds else None

    def _live(self, rnd: SecAggRound) -> bool:
        return not rnd.terminal and rnd.version == self.runtime.version

    def _session_round(self, client: int, lease_id: str, session_id: bytes) -> SecAggRound:
        lease = self._lease(client, lease_id)
        found = [r for r, _ in self._rounds if session_id and r.session_id == session_id]
        if not found:
            # Abandoned (lost in a restart, or long gone) or never existed: check in again.
            raise ServiceError("round_failed", f"no round with session {session_id.hex()[:32]}")
        rnd = found[0]
        if lease.version != rnd.version:
            raise ServiceError("bad_lease", f"lease for version {lease.version}")
        return rnd

    # -- calls ------------------------------------------------------------------------------
    async def join(self, client: int, lease_id: str, num_examples: int) -> Reply | None:
        """A selected client finished training and takes part in its round."""
        lease = self._lease(client, lease_id)
        try:
            return await self._join(client, lease_id, lease, num_examples)
        except ServiceError:
            # This client is done with this lease: its slot goes to the next check-in.
            self.slots.release(lease_id)
            raise

    async def _join(
        self, client: int, lease_id: str, lease: Lease, num_examples: int
    ) -> Reply | None:
        async with self._lock:
            self._check_running()
            rt = self.runtime
            if lease.version != rt.version:
                raise ServiceError("late", f"lease for version {lease.version}, now {rt.version}")
            if self._wall() - lease.issued_at > self.cfg.lease_timeout_s + _LEASE_GRACE_S:
                raise ServiceError("lease_expired", f"client {client}")
            weight = round(example_weight(self.alg.example_weighting, num_examples))
            joined = [(r, ls) for r, ls in self._rounds if lease_id in ls]
            if joined:
                rnd, leases = joined[0]  # a retried join: answered from the round it joined
            elif self._rounds and self._live(self._rounds[-1][0]):
                rnd, leases = self._rounds[-1]
            else:
                rnd, leases = self._new_round(), {}
                self._rounds.append((rnd, leases))
            rnd.join(client, num_examples, weight)
            leases[lease_id] = client
            # Training is over: this lease no longer holds a selection slot (FedAvg's
            # "exhausted" rule then closes the collection once every selected client is in).
            self.slots.release(lease_id)
            self._kick()
        return await self._wait(rnd, client, None)

    def _new_round(self) -> SecAggRound:
        rt = self.runtime
        return SecAggRound(
            self.params,
            dim=rt.dim,
            version=rt.version,
            cohort_size=self.alg.cohort_size,
            min_joined=self.alg.min_updates,
            entropy=self._entropy,
        )

    async def receive(
        self, client: int, lease_id: str, msg: ClientMessage, digest: bytes
    ) -> Reply | None:
        """``client``'s message of its current stage (``digest``: its canonical hash)."""
        async with self._lock:
            rnd = self._session_round(client, lease_id, msg.session_id)
            rnd.receive(client, msg, digest)
            self._kick()
        return await self._wait(rnd, client, stage_of(msg))

    async def poll(
        self, client: int, lease_id: str, session_id: bytes, sent: Stage | None
    ) -> Reply | None:
        """What comes after ``client``'s message of stage ``sent`` (None: after its join)."""
        if sent is None:
            async with self._lock:
                self._lease(client, lease_id)
                joined = [r for r, ls in self._rounds if ls.get(lease_id) == client]
                if not joined:
                    raise ServiceError("round_failed", f"client {client}: its round is gone")
                rnd = joined[0]
        else:
            async with self._lock:
                rnd = self._session_round(client, lease_id, session_id)
        return await self._wait(rnd, client, sent)

    def masked_input_shape(
        self, client: int, lease_id: str, session_id: bytes
    ) -> tuple[int, np.dtype[Any]]:
        """Length and ring dtype of ``client``'s masked input, checked before its data."""
        rnd = self._session_round(client, lease_id, session_id)
        return rnd.dim, rnd.params.codec.ring.dtype

    async def _wait(self, rnd: SecAggRound, client: int, sent: Stage | None) -> Reply | None:
        loop = asyncio.get_running_loop()
        until = loop.time() + _LONG_POLL_S
        while True:
            async with self._lock:
                reply = rnd.reply(client, sent)
                if reply is None and self._stranded(rnd):
                    self._check_running()  # the task is over: say so
                    raise ServiceError("round_failed", f"round {rnd.version} can never start")
                changed = self._changed
            left = until - loop.time()
            if reply is not None or left <= 0:
                return reply
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), left)

    def _stranded(self, rnd: SecAggRound) -> bool:
        """``rnd`` is still collecting but can never start: the task finished, or its version
        is past (its joiners would otherwise poll until their lease times out)."""
        return (
            rnd.phase is Phase.COLLECTING
            and not rnd.terminal
            and (self.runtime.finished or rnd.version != self.runtime.version)
        )

    # -- closing stages ---------------------------------------------------------------------
    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _kick(self) -> None:
        rnd = self.current
        if rnd is None or not rnd.closable(self._clock()):
            return
        if self._closer is None or self._closer.done():
            self._closer = asyncio.create_task(self._close_loop())

    async def _close_loop(self) -> None:
        while True:
            async with self._lock:
                rnd = self.current
                now = self._clock()
                if rnd is None or not rnd.closable(now):
                    return
                before = rnd.phase
                # Unmasking expands one mask per survivor (and per dropped neighbour): model-
                # sized work, off the event loop.
                try:
                    await asyncio.to_thread(rnd.advance, now)
                except Exception:  # a bug guard: a round must never hang half-closed
                    log.exception("secagg stage close failed", extra={"task": self.cfg.id})
                    rnd.fail("internal error closing a stage")
                self._after_advance(rnd, before)
                self._notify()
            if rnd.phase is Phase.UNMASKED:
                await self._apply(rnd)

    def _after_advance(self, rnd: SecAggRound, before: Phase) -> None:
        extra = {"task": self.cfg.id, "version": rnd.version, "phase": rnd.phase.value}
        closed = _STAGE_OF_PHASE.get(before)
        if closed is not None and rnd.dropouts.get(closed, 0):  # counted also if it failed
            self.dropouts[closed.name] += rnd.dropouts[closed]
        if rnd.phase is Phase.FAILED:
            self._round_failed(rnd)
            return
        if before is Phase.COLLECTING:
            # The participants are fixed: no more selections for this round (a later join
            # would be refused as late, like an over-selected FedAvg upload).
            if self.slots.round_version == rnd.version:
                self.slots.round_selected = max(self.slots.round_selected, self.slots.capacity)
            log.info("secagg round started", extra={**extra, "participants": len(rnd.participants)})
        else:
            stage = _STAGE_OF_PHASE[before]
            log.info(
                "secagg stage closed",
                extra={**extra, "stage": stage.name, "dropouts": rnd.dropouts.get(stage, 0)},
            )

    def _round_failed(self, rnd: SecAggRound) -> None:
        self.rounds_failed += 1
        # The next check-in opens a new round at the same version (as a failed FedAvg round).
        if self.slots.round_version == rnd.version:
            self.slots.round_version = -1
        log.info(
            "secagg round failed",
            extra={"task": self.cfg.id, "version": rnd.version, "reason": rnd.failure},
        )

    async def _apply(self, rnd: SecAggRound) -> None:
        assert rnd.weighted_sum is not None
        v, sid = rnd.version, rnd.session_id.hex()
        rows = [
            LedgerRow(
                self.cfg.id,
                u,
                f"secagg-{sid}",
                v,
                rnd.num_examples[u],
                v,
                0,
                float(rnd.weights[u]),
                None,
            )
            for u in sorted(rnd.survivors)
        ]
        record = SecureRoundRow(
            v + 1,
            sid,
            len(rnd.participants),
            len(rnd.survivors),
            float(rnd.total_weight),
            rnd.weighted_sum,
        )
        rt = self.runtime
        reason = "step refused"
        try:
            async with self.task_lock:
                if self._closed:  # the task moved to another process: it writes nothing here
                    return
                out = await asyncio.to_thread(
                    rt.apply_aggregate,
                    v,
                    rnd.weighted_sum,
                    float(rnd.total_weight),
                    rows,
                    record,
                )
            step = out.step
            reason = out.reason or reason
        except Exception:  # persisting failed: the runtime rebuilt itself from disk
            log.exception("secagg round could not be applied", extra={"task": self.cfg.id})
            step = None
        async with self._lock:
            if step is not None:
                rnd.applied(step.version)
                self.rounds_applied += 1
                log.info(
                    "secagg round applied",
                    extra={
                        "task": self.cfg.id,
                        "version": step.version,
                        "survivors": len(rnd.survivors),
                        "participants": len(rnd.participants),
                    },
                )
            else:
                rnd.fail(f"aggregate not applied: {reason}")
                self._round_failed(rnd)
            self._notify()

    # -- time -------------------------------------------------------------------------------
    async def tick(self, now: float) -> None:
        """Round deadline and stage deadlines (called by the coordinator's ticker)."""
        rt, slots = self.runtime, self.slots
        if rt.finished:
            return
        deadline = self.alg.round_deadline_s
        selecting = slots.round_version == rt.version
        late = selecting and deadline is not None and now - slots.round_opened_at >= deadline
        gone = selecting and slots.round_exhausted(rt.version)
        async with self._lock:
            rnd = self.current
            if rnd is not None and not rnd.terminal and rnd.version == rt.version:
                if rnd.phase is Phase.COLLECTING and (late or gone):
                    rnd.request_close()
            elif late or gone:
                # Nobody joined the selected round before its deadline: it failed.
                slots.round_version = -1
            self._kick()

    async def flush(self) -> None:
        """Wait for a stage close or step in flight (before the store closes)."""
        if self._closer is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._closer

    def close(self) -> None:
        """The task is no longer served here: forget the round in flight (call it under the
        task lock, so no step of this round is written after it)."""
        self._closed = True
        if self._closer is not None:
            self._closer.cancel()
        self._rounds.clear()
        self._notify()


_STAGE_OF_PHASE = {
    Phase.ADVERTISE_KEYS: Stage.ADVERTISE_KEYS,
    Phase.SHARE_KEYS: Stage.SHARE_KEYS,
    Phase.MASKED_INPUT: Stage.MASKED_INPUT,
    Phase.UNMASKING: Stage.UNMASKING,
}
