"""The coordinator role: the tasks, who gets which, and the durable state behind them.

It owns one :class:`~asyncfl.service.task.TaskRuntime` (aggregator role) and one
:class:`~asyncfl.service.selector.Slots` per task, routes each check-in to the first task with a
free slot, checks every upload's lease, and serialises all changes to a task under that task's
lock. Heavy work (a server step on a large model, the checkpoint fsync) runs in a worker thread
so the event loop keeps serving check-ins and streams meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from asyncfl.core.configload import to_plain
from asyncfl.core.update import FloatVector
from asyncfl.secure.tee.client import MaskedUpdate
from asyncfl.secure.tee.messages import AttestationReport, SealedSeed
from asyncfl.service.auth import Lease, Secret
from asyncfl.service.config import ServiceConfig, TaskConfig
from asyncfl.service.errors import ServiceError
from asyncfl.service.lightsecagg_task import LightSecAggUpload
from asyncfl.service.secagg_round import SecAggParams
from asyncfl.service.secagg_task import SecAggTask
from asyncfl.service.selector import RateLimiter, Slots
from asyncfl.service.store import Store
from asyncfl.service.task import Accepted, Submission, TaskRuntime
from asyncfl.service.tee import load_vendor, vendor_key_path

__all__ = ["AssignmentInfo", "Coordinator", "TaskStats", "TeeHeader", "UploadHeaderInfo"]

log = logging.getLogger("asyncfl.service.coordinator")

_RATE_WINDOW_S = 60.0
# Uploads are accepted this long past the lease timeout: the lease covers training, and the
# last chunk of a large model may still be on the wire when it runs out.
_LEASE_GRACE_S = 30.0


@dataclass(frozen=True)
class AssignmentInfo:
    task_id: str
    lease_id: str
    version: int
    dim: int
    lease_timeout_s: float
    client_config_json: str
    model_config_json: str
    clip_norm: float = 0.0
    """DP clip norm the client applies before uploading (0: none)."""
    enclave_report: AttestationReport | None = None
    """``secure_aggregation: tee``: the current enclave boot's attestation report."""
    enclave_config: bytes = b""
    """tee: the enclave's measured config (``EnclaveConfig.encode()``)."""
    secagg: SecAggParams | None = None
    """secagg / secagg+: the task's public round parameters (the client joins a round)."""


@dataclass(frozen=True)
class UploadHeaderInfo:
    task_id: str
    lease_id: str
    upload_id: str
    base_version: int
    num_examples: int
    dim: int
    float32: bool
    tee: TeeHeader | None = None
    """Present when the data are masked ring elements (``secure_aggregation: tee``)."""
    lightsecagg: bool = False
    """A LightSecAggUpload (masked field vector + mask shares; ``lightsecagg`` tasks)."""


@dataclass(frozen=True)
class TeeHeader:
    """The secure-buffer part of an upload header."""

    ring_bytes: int
    """Width of one ring element on the wire: 4 (u32) or 8 (u64)."""
    epoch: bytes
    sealed: SealedSeed


@dataclass(frozen=True)
class TaskStats:
    task_id: str
    algorithm: str
    version: int
    max_server_steps: int
    finished: bool
    active_clients: int
    concurrency_target: int
    buffered: int
    accepted_updates: int
    updates_per_s: float
    rejected: dict[str, int]
    epsilon: float | None = None
    """DP epsilon spent so far (None: the task has no DP)."""
    dp_delta: float = 0.0
    epsilon_budget: float | None = None
    budget_spent: bool = False
    discarded_updates: int = 0
    """Of ``accepted_updates``, those never to be applied (discarded buffers)."""
    secagg_rounds_applied: int = 0
    secagg_rounds_failed: int = 0
    secagg_dropouts: dict[str, int] = field(default_factory=dict)
    """secagg/secagg+: participants that missed each stage's deadline, by stage name."""


@dataclass
class _Task:
    cfg: TaskConfig
    runtime: TaskRuntime
    slots: Slots
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    accept_times: deque[float] = field(default_factory=deque)
    refused: dict[str, int] = field(default_factory=dict)
    model_json: str = ""
    client_json: str = ""
    queue: list[_Queued] = field(default_factory=list)
    """Uploads waiting for the next group commit."""
    closed: bool = False
    """No longer served here (its aggregator process lost it): nothing may write it."""
    secagg: SecAggTask | None = None
    """``secure_aggregation`` secagg/secagg+: the task's SecAgg rounds (no uploads)."""


@dataclass(frozen=True, eq=False)
class _Queued:
    item: Submission
    result: asyncio.Future[Accepted | ServiceError]


class Coordinator:
    def __init__(
        self,
        cfg: ServiceConfig,
        secret: Secret,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        task_ids: Collection[str] | None = None,
    ) -> None:
        """Recover the tasks ``task_ids`` (None: every task of ``cfg``). An aggregator process
        starts with none and opens those the coordinator gives it (:meth:`build_task`)."""
        self.cfg = cfg
        self.secret = secret
        self._clock = clock
        self._wall = wall_clock
        self.started = clock()
        root = Path(cfg.storage.dir)
        root.mkdir(parents=True, exist_ok=True)
        self.store = Store(
            root / "ledger.sqlite", keep_applied_deltas=cfg.storage.keep_applied_deltas
        )
        self.limiter = RateLimiter(cfg.selector, clock)
        self.tasks: dict[str, _Task] = {}
        self._configs = {t.id: t for t in cfg.tasks}
        self._drains: set[asyncio.Task[None]] = set()
        for t in cfg.tasks:
            if task_ids is None or t.id in task_ids:
                self.tasks[t.id] = self.build_task(t.id)

    def build_task(self, task_id: str) -> _Task:
        """Recover one configured task from storage (not yet served: see :meth:`add_task`)."""
        t = self._configs[task_id]
        root = Path(self.cfg.storage.dir)
        vendor = None
        if t.secure_aggregation.mode == "tee":
            vendor = load_vendor(vendor_key_path(t, root))
        rt = TaskRuntime(
            t, self.store, root / "checkpoints", self.cfg.storage.keep_checkpoints, vendor=vendor
        )
        model = {
            **to_plain(t.model),
            "input_shape": list(t.input_shape),
            "num_classes": t.num_classes,
        }
        task = _Task(
            t,
            rt,
            Slots(t.concurrency, rt.sync),
            model_json=json.dumps(model),
            client_json=json.dumps(to_plain(t.client)),
        )
        if t.secure_aggregation.mode in ("secagg", "secagg+"):
            task.secagg = SecAggTask(
                t, rt, task.slots, task.lock, self.secret, clock=self._clock, wall_clock=self._wall
            )
        return task

    def add_task(self, task: _Task) -> None:
        self.tasks[task.cfg.id] = task

    async def close_task(self, task_id: str) -> None:
        """Stop serving ``task_id`` here (its aggregator process lost it): a commit in flight
        finishes first, uploads still queued get ``task_moved``; the storage stays."""
        t = self.tasks.pop(task_id, None)
        if t is None:
            return
        async with t.lock:
            t.closed = True
            if t.secagg is not None:
                t.secagg.close()
            for q in t.queue:
                if not q.result.done():
                    q.result.set_result(ServiceError("task_moved", task_id))
            t.queue = []
        await asyncio.to_thread(t.runtime.close)

    async def flush(self) -> None:
        """Wait for the group commits in flight (before closing the store)."""
        await asyncio.gather(*list(self._drains), return_exceptions=True)
        for t in list(self.tasks.values()):
            if t.secagg is not None:
                await t.secagg.flush()

    def close(self) -> None:
        for t in self.tasks.values():
            t.runtime.close()
        self.store.close()

    def task(self, task_id: str) -> _Task:
        t = self.tasks.get(task_id)
        if t is None:
            if task_id in self._configs:  # configured, but another aggregator process has it
                raise ServiceError("task_moved", task_id)
            raise ServiceError("unknown_task", repr(task_id)[:80])
        return t

    def _refuse(self, t: _Task | None, err: ServiceError) -> ServiceError:
        if t is not None:
            t.refused[err.reason] = t.refused.get(err.reason, 0) + 1
        return err

    # -- selector ---------------------------------------------------------------------------
    def check_in(self, client_id: int, num_examples: int, task_id: str) -> AssignmentInfo | None:
        """Work for this client, or None (retry later). Raises ``ServiceError``; "done" is the
        ``task_finished`` refusal when every matching task has finished."""
        self.limiter.check(client_id, num_examples)
        candidates = [self.task(task_id)] if task_id else list(self.tasks.values())
        # (No candidates: an aggregator process that holds no task yet.)
        if candidates and all(t.runtime.finished for t in candidates):
            raise ServiceError("task_finished", "every task has finished")
        now = self._clock()
        for t in candidates:
            if not t.runtime.finished:
                a = self._lease(t, client_id, now)
                if a is not None:
                    return a
        return None

    def grant(self, task_id: str, client_id: int) -> AssignmentInfo | None:
        """A lease on ``task_id`` if a slot is free: the aggregator role, asked by a selector
        that has applied eligibility and rate limits. Raises ``task_finished``, ``task_moved``."""
        t = self.task(task_id)
        if t.runtime.finished:
            raise ServiceError("task_finished", task_id)
        return self._lease(t, client_id, self._clock())

    def _lease(self, t: _Task, client_id: int, now: float) -> AssignmentInfo | None:
        rt = t.runtime
        if rt.lsa is not None and not rt.lsa.can_assign(client_id):
            return None  # lightsecagg: members only, once every member registered its key
        if rt.buffer_holds(client_id):
            # tee / lightsecagg: its next update would be refused duplicate_client until this
            # buffer is released, so the device would train for nothing; it checks in again.
            # (Read without the task lock: a stale answer only delays it by one check-in.)
            return None
        lease = self.secret.sign_lease(t.cfg.id, client_id, rt.version, self._wall())
        if not t.slots.try_take(lease, rt.version, now, t.cfg.lease_timeout_s, client_id):
            return None
        return AssignmentInfo(
            t.cfg.id,
            lease,
            rt.version,
            rt.dim,
            t.cfg.lease_timeout_s,
            t.client_json,
            t.model_json,
            clip_norm=0.0 if rt.dp is None else rt.dp.clip_norm,
            enclave_report=None if rt.tee is None else rt.tee.agg.report,
            enclave_config=b"" if rt.tee is None else rt.tee.enclave.encode(),
            secagg=None if t.secagg is None else t.secagg.params,
        )

    # -- aggregator -------------------------------------------------------------------------
    def check_upload(self, client_id: int, h: UploadHeaderInfo) -> tuple[_Task, Lease]:
        """Everything about an upload that can be refused before its data is received."""
        t = self.task(h.task_id)
        try:
            lease = self.secret.verify_lease(h.lease_id)
            if lease is None or lease.client_id != client_id or lease.task_id != h.task_id:
                raise ServiceError("bad_lease", f"client {client_id} lease {h.lease_id[:80]!r}")
            if not h.upload_id or len(h.upload_id) > 128:
                raise ServiceError("malformed_message", "upload_id must have 1..128 characters")
            if self.store.find_upload(h.task_id, client_id, h.upload_id) is not None:
                # This lease ends here (its client checks in again): keeping its slot would
                # hold it until the lease expires.
                t.slots.release(h.lease_id)
                raise ServiceError("duplicate_upload", f"client {client_id} {h.upload_id!r}")
            if self._wall() - lease.issued_at > t.cfg.lease_timeout_s + _LEASE_GRACE_S:
                t.slots.release(h.lease_id)
                raise ServiceError("lease_expired", f"client {client_id}")
            if h.base_version < lease.version:
                raise ServiceError("bad_version", f"base {h.base_version} < lease {lease.version}")
            if t.secagg is not None:
                raise ServiceError("bad_encoding", "secagg task: updates go through SecAgg")
            if (t.runtime.lsa is not None) != h.lightsecagg:
                raise ServiceError("bad_encoding", "lightsecagg tasks take LightSecAggUpload only")
            tee = t.runtime.tee
            if tee is not None:
                if h.tee is None:
                    raise ServiceError("bad_encoding", "tee task: masked ring vector expected")
                if h.tee.ring_bytes != tee.agg.codec.ring.dtype.itemsize:
                    raise ServiceError("bad_dtype", f"ring of {h.tee.ring_bytes} bytes")
            elif h.tee is not None:
                raise ServiceError("bad_encoding", "masked upload to a task without tee")
            elif not h.float32 and not h.lightsecagg:
                raise ServiceError("bad_dtype", "dtype is not float32")
            if h.dim != t.runtime.dim:
                raise ServiceError("bad_shape", f"dim {h.dim} != model {t.runtime.dim}")
        except ServiceError as err:
            raise self._refuse(t, err) from None
        return t, lease

    async def submit(
        self,
        client_id: int,
        h: UploadHeaderInfo,
        delta: FloatVector,
        masked: MaskedUpdate | None = None,
        lightsecagg: LightSecAggUpload | None = None,
    ) -> Accepted:
        t = self.task(h.task_id)
        mine = _Queued(
            Submission(
                client_id, h.upload_id, h.base_version, h.num_examples, delta, masked, lightsecagg
            ),
            asyncio.get_running_loop().create_future(),
        )
        t.queue.append(mine)
        # Group commit: a drain task takes every upload queued by the time it holds the lock
        # and commits them in one transaction (one fsync); the drains of uploads already
        # taken find the queue empty. The drain is a task of its own, not part of this
        # handler: a client that hangs up mid-commit must neither release the lock while the
        # worker thread still writes nor leave the other uploads of its batch unanswered.
        drain = asyncio.create_task(self._drain(t))
        self._drains.add(drain)
        drain.add_done_callback(self._drains.discard)
        res = await asyncio.shield(mine.result)
        if isinstance(res, ServiceError):
            if res.reason != "duplicate_upload":
                t.slots.release(h.lease_id)
            raise self._refuse(t, res)
        t.slots.release(h.lease_id)
        now = self._clock()
        t.accept_times.append(now)
        while t.accept_times and t.accept_times[0] < now - _RATE_WINDOW_S:
            t.accept_times.popleft()
        log.info(
            "update accepted",
            extra={
                "task": h.task_id,
                "client": client_id,
                "version": res.version,
                "staleness": res.staleness,
                "stepped": res.stepped,
            },
        )
        return res

    async def _drain(self, t: _Task) -> None:
        async with t.lock:
            if not t.queue or t.closed:
                return
            batch, t.queue = t.queue, []
            try:
                results = await asyncio.to_thread(t.runtime.submit_many, [q.item for q in batch])
            except Exception:  # submit_many answers every item itself; this is a bug guard
                log.exception("group commit failed")
                results = [ServiceError("internal")] * len(batch)
            for q, r in zip(batch, results, strict=True):
                if not q.result.done():
                    q.result.set_result(r)

    def release(self, task_id: str, lease_id: str) -> None:
        """The client's upload failed in transit: free its slot for the next check-in."""
        t = self.tasks.get(task_id)
        if t is not None:
            t.slots.release(lease_id)

    async def tick(self) -> None:
        """Expire leases; close FedAvg rounds whose deadline passed or whose clients are gone."""
        now = self._clock()
        for t in list(self.tasks.values()):  # an aggregator process may open/close tasks meanwhile
            t.slots.expire(now)
            if t.secagg is not None:
                await t.secagg.tick(now)
                continue
            lsa = t.runtime.lsa
            if lsa is not None:  # unmask or discard the closed buffers whose time has come
                if lsa.due(now):
                    async with t.lock:
                        if not t.closed:
                            await asyncio.to_thread(t.runtime.settle_lightsecagg, now)
                continue
            rt = t.runtime
            if not rt.sync or rt.finished or t.slots.round_version != rt.version:
                continue
            deadline = getattr(t.cfg.algorithm, "round_deadline_s", None)
            late = deadline is not None and now - t.slots.round_opened_at >= deadline
            if late or t.slots.round_exhausted(rt.version):
                version = rt.version
                async with t.lock:
                    if t.closed:
                        continue
                    out = await asyncio.to_thread(rt.deadline, version)
                # The next check-in opens the next round (the version moved, or the slots are
                # reset because the round failed).
                t.slots.round_version = -1
                log.info(
                    "round closed",
                    extra={"task": t.cfg.id, "version": version, "reason": out.reason or "step"},
                )

    # -- operator view ----------------------------------------------------------------------
    def stats(self) -> list[TaskStats]:
        now = self._clock()
        out = []
        for t in self.tasks.values():
            while t.accept_times and t.accept_times[0] < now - _RATE_WINDOW_S:
                t.accept_times.popleft()
            window = max(min(_RATE_WINDOW_S, now - self.started), 1e-9)
            rejected = dict(t.refused)
            dp = t.runtime.dp
            out.append(
                TaskStats(
                    task_id=t.cfg.id,
                    algorithm=t.cfg.algorithm_name,
                    version=t.runtime.version,
                    max_server_steps=t.cfg.max_server_steps,
                    finished=t.runtime.finished,
                    active_clients=len(t.slots.active),
                    concurrency_target=t.slots.capacity,
                    buffered=t.runtime.agg.buffered,
                    accepted_updates=t.runtime.accepted_total,
                    updates_per_s=len(t.accept_times) / window,
                    rejected=rejected,
                    epsilon=None if dp is None else dp.accountant.epsilon(),
                    dp_delta=0.0 if dp is None else dp.cfg.delta,
                    epsilon_budget=None if dp is None else dp.cfg.epsilon_budget,
                    budget_spent=t.runtime.budget_spent,
                    discarded_updates=t.runtime.discarded_total,
                    secagg_rounds_applied=0 if t.secagg is None else t.secagg.rounds_applied,
                    secagg_rounds_failed=0 if t.secagg is None else t.secagg.rounds_failed,
                    secagg_dropouts={} if t.secagg is None else dict(t.secagg.dropouts),
                )
            )
        return out
