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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from asyncfl.core.configload import to_plain
from asyncfl.core.update import FloatVector
from asyncfl.secure.tee.client import MaskedUpdate
from asyncfl.secure.tee.messages import AttestationReport, SealedSeed
from asyncfl.service.auth import Lease, Secret
from asyncfl.service.config import ServiceConfig, TaskConfig
from asyncfl.service.errors import ServiceError
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
    ) -> None:
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
        self._drains: set[asyncio.Task[None]] = set()
        for t in cfg.tasks:
            vendor = None
            if t.secure_aggregation.mode == "tee":
                vendor = load_vendor(vendor_key_path(t, root))
            rt = TaskRuntime(
                t, self.store, root / "checkpoints", cfg.storage.keep_checkpoints, vendor=vendor
            )
            model = {
                **to_plain(t.model),
                "input_shape": list(t.input_shape),
                "num_classes": t.num_classes,
            }
            self.tasks[t.id] = _Task(
                t,
                rt,
                Slots(t.concurrency, rt.sync),
                model_json=json.dumps(model),
                client_json=json.dumps(to_plain(t.client)),
            )

    async def flush(self) -> None:
        """Wait for the group commits in flight (before closing the store)."""
        await asyncio.gather(*list(self._drains), return_exceptions=True)

    def close(self) -> None:
        for t in self.tasks.values():
            t.runtime.close()
        self.store.close()

    def task(self, task_id: str) -> _Task:
        t = self.tasks.get(task_id)
        if t is None:
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
        if all(t.runtime.finished for t in candidates):
            raise ServiceError("task_finished", "every task has finished")
        now = self._clock()
        for t in candidates:
            rt = t.runtime
            if rt.finished:
                continue
            lease = self.secret.sign_lease(t.cfg.id, client_id, rt.version, self._wall())
            if t.slots.try_take(lease, rt.version, now, t.cfg.lease_timeout_s):
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
                )
        return None

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
                raise ServiceError("duplicate_upload", f"client {client_id} {h.upload_id!r}")
            if self._wall() - lease.issued_at > t.cfg.lease_timeout_s + _LEASE_GRACE_S:
                t.slots.release(h.lease_id)
                raise ServiceError("lease_expired", f"client {client_id}")
            if h.base_version < lease.version:
                raise ServiceError("bad_version", f"base {h.base_version} < lease {lease.version}")
            tee = t.runtime.tee
            if tee is not None:
                if h.tee is None:
                    raise ServiceError("bad_encoding", "tee task: masked ring vector expected")
                if h.tee.ring_bytes != tee.agg.codec.ring.dtype.itemsize:
                    raise ServiceError("bad_dtype", f"ring of {h.tee.ring_bytes} bytes")
            elif h.tee is not None:
                raise ServiceError("bad_encoding", "masked upload to a task without tee")
            elif not h.float32:
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
    ) -> Accepted:
        t = self.task(h.task_id)
        mine = _Queued(
            Submission(client_id, h.upload_id, h.base_version, h.num_examples, delta, masked),
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
            if not t.queue:
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
        for t in self.tasks.values():
            t.slots.expire(now)
            rt = t.runtime
            if not rt.sync or rt.finished or t.slots.round_version != rt.version:
                continue
            deadline = getattr(t.cfg.algorithm, "round_deadline_s", None)
            late = deadline is not None and now - t.slots.round_opened_at >= deadline
            if late or t.slots.round_exhausted(rt.version):
                version = rt.version
                async with t.lock:
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
                )
            )
        return out
