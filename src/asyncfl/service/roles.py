"""The service's roles as separate processes (``asyncfl serve --role``), in Papaya's shape.

::

    device ──CheckIn──► selector ──AcquireLease──► aggregator (owns task T)
       │                   │  ▲                        │  ▲
       │                   └──┼─Routes──► coordinator ◄┘  │ Heartbeat: "alive at ADDR";
       │                      │   (task -> aggregator,    │ answer: "you own T, epoch e"
       │                      │    durable, fenced)       │
       └── DownloadModel / UploadUpdate (assignment.aggregator_address) ──────┘

* **coordinator**: which aggregator owns which task (``ownership.py``, durable in the
  ledger's SQLite file); moves the task of an aggregator silent for ``roles.owner_ttl_s``.
* **aggregator**: a :class:`~asyncfl.service.coordinator.Coordinator` core holding only the
  tasks it was given (recovered from checkpoint + ledger exactly as after a restart, with its
  ledger writes fenced by the ownership epoch); serves leases to selectors and the model
  download / update upload to clients.
* **selector**: ``routing.py``; holds no task state.

Coordinator and aggregators share ``storage.dir`` (one SQLite ledger in WAL mode: one host,
or a filesystem with working POSIX locks and shared memory). ``--role all`` (the default)
runs :func:`asyncfl.service.server.start_server` as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc

from asyncfl.service.auth import AuthInterceptor, Secret, bearer_metadata
from asyncfl.service.config import AggregatorSection, ServiceConfig
from asyncfl.service.coordinator import Coordinator
from asyncfl.service.errors import ServiceError
from asyncfl.service.ownership import OwnerBook, Ownership
from asyncfl.service.proto.asyncfl.v1 import internal_pb2 as ipb
from asyncfl.service.proto.asyncfl.v1 import internal_pb2_grpc as ipb_grpc
from asyncfl.service.proto.asyncfl.v1 import service_pb2_grpc as pb_grpc
from asyncfl.service.routing import INTERNAL_TIMEOUT_S, Dialer, SelectorServicer
from asyncfl.service.server import (
    Servicer,
    _fail,
    _tick_forever,
    assignment_message,
    bind,
    grpc_options,
    run_server,
    serve_until_signal,
)
from asyncfl.service.store import Store

__all__ = [
    "Role",
    "RoleHandle",
    "run_role",
    "start_aggregator",
    "start_coordinator",
    "start_selector",
]

log = logging.getLogger("asyncfl.service.roles")

Role = Literal["all", "coordinator", "selector", "aggregator"]
Context = grpc.aio.ServicerContext[Any, Any]


@dataclass
class RoleHandle:
    """A running role in this process (tests start several in one event loop)."""

    role: Role
    server: grpc.aio.Server
    port: int
    address: str
    """Where the others reach it (the aggregator's advertised address)."""
    core: Coordinator | None = None
    """Aggregator: the tasks it serves now."""
    _loops: list[asyncio.Task[None]] = field(default_factory=list)
    _close: Callable[[bool], Awaitable[None]] | None = None

    async def stop(self, grace_s: float | None = 1.0, *, leave: bool = True) -> None:
        """Stop serving. ``leave=False`` (aggregator) keeps its tasks assigned, as a crash
        would: they move only after ``roles.owner_ttl_s``."""
        for t in self._loops:
            t.cancel()
        for t in self._loops:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.server.stop(grace_s)
        if self._close is not None:
            await self._close(leave)


def _secret(cfg: ServiceConfig) -> Secret:
    if cfg.auth.secret_file is None:  # ServiceConfig.validate refuses this; keep mypy honest
        raise ValueError("auth.secret_file is required")
    return Secret.from_file(cfg.auth.secret_file)


def _new_server(cfg: ServiceConfig, secret: Secret) -> grpc.aio.Server:
    interceptor = AuthInterceptor(secret, cfg.auth.operator_principal, cfg.roles.internal_principal)
    return grpc.aio.server(
        interceptors=[interceptor], options=grpc_options(cfg.server.max_message_bytes)
    )


def _internal_md(cfg: ServiceConfig, secret: Secret) -> tuple[tuple[str, str], ...]:
    return bearer_metadata(secret.token(cfg.roles.internal_principal))


# -- coordinator ----------------------------------------------------------------------------
class _CoordinatorServicer(ipb_grpc.CoordinatorRoleServicer):
    def __init__(self, own: Ownership, store: Store) -> None:
        self.own = own
        self.store = store

    async def Heartbeat(
        self, request: ipb.HeartbeatRequest, context: Context
    ) -> ipb.HeartbeatResponse:
        try:
            if not isinstance(request, ipb.HeartbeatRequest) or not (
                request.instance and request.address
            ):
                raise ServiceError("malformed_message", "heartbeat without instance or address")
            try:
                owned = self.own.heartbeat(
                    request.aggregator_id,
                    request.instance,
                    request.address,
                    leaving=request.leaving,
                )
            except KeyError:
                raise ServiceError(
                    "permission_denied", f"aggregator {request.aggregator_id!r} not configured"
                ) from None
        except ServiceError as err:
            await _fail(context, err)
        except Exception:
            log.exception("heartbeat failed")
            await _fail(context, ServiceError("internal"))
        return ipb.HeartbeatResponse(
            tasks=[ipb.OwnedTask(task_id=t, epoch=e) for t, e in owned.items()]
        )

    async def Routes(self, request: ipb.RoutesRequest, context: Context) -> ipb.RoutesResponse:
        out = []
        for r in self.own.routes():
            rec = self.store.task(r.task_id)
            out.append(
                ipb.Route(
                    task_id=r.task_id,
                    aggregator_id=r.aggregator_id,
                    address=r.address,
                    model_version=0 if rec is None else rec.version,
                    finished=rec is not None and rec.finished,
                )
            )
        return ipb.RoutesResponse(routes=out)


async def start_coordinator(
    cfg: ServiceConfig, *, clock: Callable[[], float] = time.monotonic
) -> RoleHandle:
    secret = _secret(cfg)
    root = Path(cfg.storage.dir)
    store = Store(root / "ledger.sqlite", keep_applied_deltas=cfg.storage.keep_applied_deltas)
    book = OwnerBook(root / "ledger.sqlite")
    own = Ownership(
        [t.id for t in cfg.tasks],
        {a.id: a.tasks for a in cfg.roles.aggregators},
        cfg.roles.owner_ttl_s,
        clock,
        book,
        # Aggregators started with the coordinator all register before tasks are spread.
        settle_s=2 * cfg.roles.heartbeat_s,
    )
    server = _new_server(cfg, secret)
    ipb_grpc.add_CoordinatorRoleServicer_to_server(  # type: ignore[no-untyped-call]
        _CoordinatorServicer(own, store), server
    )
    port = bind(server, cfg.roles.coordinator, cfg.server)
    await server.start()
    log.info("coordinator serving", extra={"address": cfg.roles.coordinator})

    async def close(_leave: bool) -> None:
        book.close()
        store.close()

    return RoleHandle("coordinator", server, port, cfg.roles.coordinator, _close=close)


# -- selector -------------------------------------------------------------------------------
async def start_selector(cfg: ServiceConfig) -> RoleHandle:
    secret = _secret(cfg)
    dialer = Dialer(cfg)
    sel = SelectorServicer(cfg, secret, dialer)
    server = _new_server(cfg, secret)
    pb_grpc.add_FederatedLearningServicer_to_server(sel, server)  # type: ignore[no-untyped-call]
    s = cfg.server
    port = bind(server, f"{s.host}:{s.port}", s)
    await server.start()
    log.info("selector serving", extra={"address": f"{s.host}:{port}", "tls": not s.insecure})

    async def close(_leave: bool) -> None:
        await dialer.close()

    loop = asyncio.create_task(sel.refresh_forever())
    return RoleHandle("selector", server, port, f"{s.host}:{port}", _loops=[loop], _close=close)


# -- aggregator -----------------------------------------------------------------------------
class _AggregatorServicer(ipb_grpc.AggregatorRoleServicer):
    def __init__(self, agg: _Aggregator) -> None:
        self.agg = agg

    async def AcquireLease(self, request: ipb.LeaseRequest, context: Context) -> ipb.LeaseResponse:
        try:
            if not isinstance(request, ipb.LeaseRequest):
                raise ServiceError("malformed_message", "lease request")
            a = self.agg.core.grant(request.task_id, request.client_id)
        except ServiceError as err:
            if err.reason == "task_finished":
                return ipb.LeaseResponse(finished=True)
            await _fail(context, err)
        except Exception:
            log.exception("lease failed")
            await _fail(context, ServiceError("internal"))
        if a is None:
            return ipb.LeaseResponse(full=True)
        return ipb.LeaseResponse(assignment=assignment_message(a, self.agg.address))


class _Aggregator:
    """Heartbeats to the coordinator and opens / closes the tasks its answers name."""

    def __init__(
        self,
        cfg: ServiceConfig,
        secret: Secret,
        entry: AggregatorSection,
        dialer: Dialer,
        clock: Callable[[], float],
    ) -> None:
        self.cfg = cfg
        self.entry = entry
        self.core = Coordinator(cfg, secret, task_ids=())
        self.instance = secrets.token_hex(8)
        self.address = ""
        self.md = _internal_md(cfg, secret)
        self.stub = ipb_grpc.CoordinatorRoleStub(  # type: ignore[no-untyped-call]
            dialer.channel(cfg.roles.coordinator)
        )
        self._clock = clock
        self.last_ok = -float("inf")
        """Send time of the last answered heartbeat (owner_ttl_s / 2 later it stops serving)."""
        self.epochs: dict[str, int] = {}
        """Tasks open here, with the epoch their ledger writes are fenced with."""
        self.wanted: dict[str, int] = {}
        self._changed = asyncio.Event()

    async def beat(self, *, leaving: bool = False) -> dict[str, int]:
        sent = self._clock()
        resp: ipb.HeartbeatResponse = await self.stub.Heartbeat(
            ipb.HeartbeatRequest(
                aggregator_id=self.entry.id,
                instance=self.instance,
                address=self.address,
                leaving=leaving,
            ),
            metadata=self.md,
            # Bounded so that a hung call cannot outlast the owner_ttl_s / 2 self-fence.
            timeout=min(INTERNAL_TIMEOUT_S, self.cfg.roles.owner_ttl_s / 4),
        )
        self.last_ok = sent
        return {o.task_id: o.epoch for o in resp.tasks}

    async def heartbeat_forever(self) -> None:
        r = self.cfg.roles
        while True:
            try:
                self.wanted = await self.beat()
            except grpc.aio.AioRpcError as err:
                log.warning("coordinator unreachable", extra={"code": err.code().name})
                if self._clock() - self.last_ok > r.owner_ttl_s / 2 and self.wanted:
                    # The coordinator may give our tasks away after owner_ttl_s: stop first.
                    log.warning("no answered heartbeat: no longer serving", extra={})
                    self.wanted = {}
            self._changed.set()
            await asyncio.sleep(r.heartbeat_s)

    async def reconcile_forever(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            try:
                await self.reconcile()
            except Exception:  # a bug guard: the next heartbeat reconciles again
                log.exception("reconcile failed")

    async def reconcile(self) -> None:
        wanted = dict(self.wanted)
        for t, e in list(self.epochs.items()):
            if wanted.get(t) != e:
                del self.epochs[t]
                # Shielded: a shutdown arriving meanwhile must not leave it half closed.
                await asyncio.shield(self.core.close_task(t))
                log.info("task released", extra={"task": t, "epoch": e})
        for t, e in wanted.items():
            if t in self.epochs:
                continue
            try:
                # Fence first: recovery may write (a tee task discards its unreleased buffer).
                await asyncio.to_thread(self.core.store.fence, t, e)
                task = await asyncio.to_thread(self.core.build_task, t)
            except Exception:  # retried at the next heartbeat; the other tasks still open
                log.exception("cannot open task %s", t)
                continue
            self.core.add_task(task)
            self.epochs[t] = e
            log.info("task opened", extra={"task": t, "epoch": e, "version": task.runtime.version})

    async def close(self, leave: bool) -> None:
        await self.core.flush()
        for t in list(self.epochs):
            await self.core.close_task(t)
        self.epochs.clear()
        if leave:
            try:
                await self.beat(leaving=True)
            except grpc.aio.AioRpcError as err:
                log.warning("could not give the tasks back", extra={"code": err.code().name})
        self.core.close()


async def start_aggregator(
    cfg: ServiceConfig, aggregator_id: str, *, clock: Callable[[], float] = time.monotonic
) -> RoleHandle:
    match = [a for a in cfg.roles.aggregators if a.id == aggregator_id]
    if not match:
        known = [a.id for a in cfg.roles.aggregators]
        raise ValueError(f"no aggregator {aggregator_id!r} in roles.aggregators; known: {known}")
    entry = match[0]
    secret = _secret(cfg)
    dialer = Dialer(cfg)
    agg = _Aggregator(cfg, secret, entry, dialer, clock)
    server = _new_server(cfg, secret)
    pb_grpc.add_FederatedLearningServicer_to_server(  # type: ignore[no-untyped-call]
        Servicer(agg.core, cfg.server.chunk_bytes), server
    )
    ipb_grpc.add_AggregatorRoleServicer_to_server(  # type: ignore[no-untyped-call]
        _AggregatorServicer(agg), server
    )
    port = bind(server, entry.listen, cfg.server)
    host = entry.listen.rpartition(":")[0]
    agg.address = entry.advertise if entry.advertise is not None else f"{host}:{port}"
    await server.start()
    log.info("aggregator serving", extra={"id": entry.id, "address": agg.address})
    loops = [
        asyncio.create_task(agg.heartbeat_forever()),
        asyncio.create_task(agg.reconcile_forever()),
        asyncio.create_task(_tick_forever(agg.core)),
    ]

    async def close(leave: bool) -> None:
        await agg.close(leave)
        await dialer.close()

    return RoleHandle("aggregator", server, port, agg.address, agg.core, loops, close)


# -- process entry --------------------------------------------------------------------------
def run_role(cfg: ServiceConfig, role: Role = "all", aggregator_id: str | None = None) -> None:
    """Serve ``role`` until SIGINT/SIGTERM (the CLI's ``asyncfl serve --role``)."""
    if role == "all":
        run_server(cfg)
        return
    if role == "aggregator" and aggregator_id is None:
        ids = [a.id for a in cfg.roles.aggregators]
        if len(ids) != 1:
            raise ValueError(f"several aggregators are configured ({ids}): give --id")
        aggregator_id = ids[0]

    async def start() -> RoleHandle:
        if role == "coordinator":
            return await start_coordinator(cfg)
        if role == "selector":
            return await start_selector(cfg)
        assert aggregator_id is not None
        return await start_aggregator(cfg, aggregator_id)

    serve_until_signal(start)
