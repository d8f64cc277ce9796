"""The selector role as its own process: check-in, eligibility, rate limits, and routing.

A selector holds no task state. It learns from the coordinator which aggregator serves which
task (``Routes``, polled every ``roles.heartbeat_s`` and again whenever an aggregator fails
to answer), applies the eligibility and rate-limit checks of ``selector.py``, and asks the
task's aggregator for the client's lease (``AcquireLease``): the owner alone counts the
task's slots, so the concurrency target and a FedAvg cohort hold however many selectors run.
The assignment it returns names the aggregator (``aggregator_address``); the client downloads
from and uploads to that aggregator directly, so no model or update passes through here. The
secure modes' protocol traffic goes there as well: a SecAgg round's stages (the assignment
names the aggregator), and the LightSecAgg registration, mailbox polls and answers of the
groups a check-in lists with their aggregators (``lightsecagg_addresses``; membership is
known from the config alone). Whether a TEE or LightSecAgg buffer already holds the client's
update is decided by the owner when it grants the lease, like the slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from asyncfl.service.auth import Secret, principal_of
from asyncfl.service.config import ServiceConfig
from asyncfl.service.errors import ServiceError
from asyncfl.service.lightsecagg_task import in_group
from asyncfl.service.proto.asyncfl.v1 import internal_pb2 as ipb
from asyncfl.service.proto.asyncfl.v1 import internal_pb2_grpc as ipb_grpc
from asyncfl.service.proto.asyncfl.v1 import service_pb2 as pb
from asyncfl.service.proto.asyncfl.v1 import service_pb2_grpc as pb_grpc
from asyncfl.service.selector import RateLimiter
from asyncfl.service.server import _fail

__all__ = ["Dialer", "SelectorServicer"]

log = logging.getLogger("asyncfl.service.routing")

Context = grpc.aio.ServicerContext[Any, Any]
INTERNAL_TIMEOUT_S = 5.0
"""Deadline of one call between roles (a lease, a route table, a heartbeat's upper bound)."""


class Dialer:
    """One channel per address, with the TLS trust the roles use with each other."""

    def __init__(self, cfg: ServiceConfig) -> None:
        s, r = cfg.server, cfg.roles
        self._root: bytes | None = None
        if not s.insecure:
            root = r.ca_cert if r.ca_cert is not None else s.tls_cert
            assert root is not None  # ServerSection.validate: TLS needs a certificate
            with open(root, "rb") as f:
                self._root = f.read()
        self._options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            # A restarted peer is back within a second (gRPC's default backoff reaches minutes).
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            if self._root is None:
                ch = grpc.aio.insecure_channel(address, options=self._options)
            else:
                creds = grpc.ssl_channel_credentials(root_certificates=self._root)
                ch = grpc.aio.secure_channel(address, creds, options=self._options)
            self._channels[address] = ch
        return ch

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()


class SelectorServicer(pb_grpc.FederatedLearningServicer):
    def __init__(
        self,
        cfg: ServiceConfig,
        secret: Secret,
        dialer: Dialer,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.secret = secret
        self.dialer = dialer
        self._clock = clock
        self.started = clock()
        self.limiter = RateLimiter(cfg.selector, clock)
        self.task_ids = [t.id for t in cfg.tasks]
        self.routes: dict[str, ipb.Route] = {}
        self.finished: set[str] = set()
        """Finished is final: learnt from the ledger (routes) or from an aggregator."""
        self.md = (("authorization", f"Bearer {secret.token(cfg.roles.internal_principal)}"),)
        self._coord = ipb_grpc.CoordinatorRoleStub(  # type: ignore[no-untyped-call]
            dialer.channel(cfg.roles.coordinator)
        )
        self._refresh_lock = asyncio.Lock()
        self._refreshed_at = -float("inf")
        self._background: set[asyncio.Task[None]] = set()

    # -- routes -----------------------------------------------------------------------------
    async def refresh(self, max_age_s: float = 0.0) -> None:
        """Fetch the route table unless one younger than ``max_age_s`` is at hand (concurrent
        callers share one call). Raises ``grpc.aio.AioRpcError`` if the coordinator fails."""
        async with self._refresh_lock:
            # Aged by when the table was asked for: one asked before a change and answered
            # after it must not pass for fresh.
            if self._clock() - self._refreshed_at < max_age_s:
                return
            sent = self._clock()
            resp: ipb.RoutesResponse = await self._coord.Routes(
                ipb.RoutesRequest(), metadata=self.md, timeout=INTERNAL_TIMEOUT_S
            )
            self.routes = {r.task_id: r for r in resp.routes}
            self.finished |= {r.task_id for r in resp.routes if r.finished}
            self._refreshed_at = sent

    async def refresh_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except grpc.aio.AioRpcError as err:
                log.warning("coordinator unreachable", extra={"code": err.code().name})
            await asyncio.sleep(self.cfg.roles.heartbeat_s)

    def _stale(self) -> None:
        """An aggregator failed to answer: refresh soon, without making this client wait."""

        async def go() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError):  # the periodic refresh logs it
                await self.refresh(max_age_s=self.cfg.roles.heartbeat_s / 4)

        task = asyncio.create_task(go())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _route(self, task_id: str) -> ipb.Route | None:
        route = self.routes.get(task_id)
        if route is None or not route.address:
            try:
                await self.refresh(max_age_s=self.cfg.roles.heartbeat_s / 4)
            except grpc.aio.AioRpcError:
                return None
            route = self.routes.get(task_id)
        return route if route is not None and route.address else None

    # -- check-in ---------------------------------------------------------------------------
    def _client_id(self, context: Context) -> int:
        principal = principal_of(self.secret, context.invocation_metadata())
        if principal is None or not principal.isdigit():  # the interceptor already refused it
            raise ServiceError("unauthenticated")
        return int(principal)

    async def check_in(
        self, client_id: int, num_examples: int, task_id: str
    ) -> pb.Assignment | None:
        """The client's assignment from the first task whose aggregator has a free slot, or
        None (retry later). Raises ``task_finished`` when every candidate has finished and
        ``aggregator_unavailable`` when no slot was found and some aggregator did not answer."""
        self.limiter.check(client_id, num_examples)
        if task_id and task_id not in self.task_ids:
            raise ServiceError("unknown_task", repr(task_id)[:80])
        candidates = [task_id] if task_id else self.task_ids
        unavailable = False
        for t in candidates:
            if t in self.finished:
                continue
            route = await self._route(t)
            if route is None:
                unavailable = True
                continue
            stub = ipb_grpc.AggregatorRoleStub(  # type: ignore[no-untyped-call]
                self.dialer.channel(route.address)
            )
            try:
                resp: ipb.LeaseResponse = await stub.AcquireLease(
                    ipb.LeaseRequest(task_id=t, client_id=client_id),
                    metadata=self.md,
                    timeout=INTERNAL_TIMEOUT_S,
                )
            except grpc.aio.AioRpcError as err:
                log.info(
                    "aggregator did not answer",
                    extra={"task": t, "address": route.address, "code": err.code().name},
                )
                unavailable = True
                self._stale()
                continue
            kind = resp.WhichOneof("outcome")
            if kind == "assignment":
                return resp.assignment
            if kind == "finished":
                self.finished.add(t)
        if all(t in self.finished for t in candidates):
            raise ServiceError("task_finished", "every task has finished")
        if unavailable:
            raise ServiceError("aggregator_unavailable", "no free slot among the reachable ones")
        return None

    async def CheckIn(self, request: pb.CheckInRequest, context: Context) -> pb.CheckInResponse:
        try:
            client = self._client_id(context)
            a = await self.check_in(client, request.num_examples, request.task_id)
        except ServiceError as err:
            if err.reason == "task_finished":
                return pb.CheckInResponse(done=True)
            await _fail(context, err)
        except Exception:
            log.exception("check-in failed")
            await _fail(context, ServiceError("internal"))
        groups = self.groups(client)
        if a is None:
            return pb.CheckInResponse(
                retry_after_s=self.cfg.selector.retry_after_s,
                lightsecagg_tasks=list(groups),
                lightsecagg_addresses=groups,
            )
        return pb.CheckInResponse(
            assignment=a, lightsecagg_tasks=list(groups), lightsecagg_addresses=groups
        )

    def groups(self, client_id: int) -> dict[str, str]:
        """The unfinished lightsecagg tasks whose group ``client_id`` belongs to, each with
        the aggregator the device registers, polls and answers at (the selector relays none
        of that traffic). A task without a live aggregator is left out until it has one."""
        out = {}
        for t in self.cfg.tasks:
            if t.id in self.finished or not in_group(t, client_id):
                continue
            route = self.routes.get(t.id)
            if route is not None and route.address:
                out[t.id] = route.address
        return out

    async def Locate(self, request: pb.LocateRequest, context: Context) -> pb.LocateResponse:
        try:
            self._client_id(context)
            if request.task_id not in self.task_ids:
                raise ServiceError("unknown_task", repr(request.task_id)[:80])
            # Asked after an upload failed at the old address: the cached route may be stale.
            with contextlib.suppress(grpc.aio.AioRpcError):  # then answer from the cache
                await self.refresh(max_age_s=self.cfg.roles.heartbeat_s / 2)
            route = self.routes.get(request.task_id)
            if route is None or not route.address:
                raise ServiceError("aggregator_unavailable", request.task_id)
        except ServiceError as err:
            await _fail(context, err)
        return pb.LocateResponse(aggregator_address=route.address)

    # -- not here: the data path goes to the aggregator -----------------------------------
    async def DownloadModel(
        self, request: pb.DownloadRequest, context: Context
    ) -> AsyncIterator[pb.ModelChunk]:
        await _fail(context, ServiceError("task_moved", "download at the selector"))
        yield pb.ModelChunk()  # pragma: no cover - _fail raises

    async def UploadUpdate(
        self, request_iterator: AsyncIterator[pb.UploadChunk], context: Context
    ) -> pb.UploadResponse:
        await _fail(context, ServiceError("task_moved", "upload at the selector"))

    # The secure protocols' traffic goes to the task's aggregator too (Assignment and
    # CheckInResponse.lightsecagg_addresses name it): a device that sends it here is told to
    # ask where the task is, never served from a stale copy.
    async def SecAgg(self, request: pb.SecAggRequest, context: Context) -> pb.SecAggResponse:
        await _fail(context, ServiceError("task_moved", "secagg step at the selector"))

    async def SecAggMaskedInput(
        self, request_iterator: AsyncIterator[pb.SecAggInputChunk], context: Context
    ) -> pb.SecAggResponse:
        await _fail(context, ServiceError("task_moved", "secagg input at the selector"))

    async def LightSecAggRegister(
        self, request: pb.LightSecAggRegisterRequest, context: Context
    ) -> pb.LightSecAggGroup:
        await _fail(context, ServiceError("task_moved", "lightsecagg register at the selector"))

    async def LightSecAggPoll(
        self, request: pb.LightSecAggPollRequest, context: Context
    ) -> AsyncIterator[pb.LightSecAggMailboxItem]:
        await _fail(context, ServiceError("task_moved", "lightsecagg poll at the selector"))
        yield pb.LightSecAggMailboxItem()  # pragma: no cover - _fail raises

    async def LightSecAggAnswer(
        self, request: pb.LightSecAggAnswerRequest, context: Context
    ) -> pb.LightSecAggAnswerResponse:
        await _fail(context, ServiceError("task_moved", "lightsecagg answer at the selector"))

    async def LightSecAggUpload(
        self, request_iterator: AsyncIterator[pb.LightSecAggUploadChunk], context: Context
    ) -> pb.UploadResponse:
        await _fail(context, ServiceError("task_moved", "lightsecagg upload at the selector"))

    # -- operator view ----------------------------------------------------------------------
    async def Status(self, request: pb.StatusRequest, context: Context) -> pb.StatusResponse:
        """Every aggregator's Status (asked with the operator's own token), merged; a task
        without a reachable aggregator shows its committed version from the ledger."""
        md = tuple((k, v) for k, v in context.invocation_metadata() or () if k == "authorization")
        by_address: dict[str, list[str]] = {}
        for task_id, route in self.routes.items():
            if route.address:
                by_address.setdefault(route.address, []).append(task_id)
        addresses = list(by_address)
        answers = await asyncio.gather(
            *(
                pb_grpc.FederatedLearningStub(  # type: ignore[no-untyped-call]
                    self.dialer.channel(a)
                ).Status(pb.StatusRequest(), metadata=md, timeout=INTERNAL_TIMEOUT_S)
                for a in addresses
            ),
            return_exceptions=True,
        )
        found: dict[str, pb.TaskStatus] = {}
        for address, ans in zip(addresses, answers, strict=True):
            if isinstance(ans, pb.StatusResponse):
                found.update({s.task_id: s for s in ans.tasks if s.task_id in by_address[address]})
        tasks = []
        for t in self.cfg.tasks:
            if t.id in found:
                tasks.append(found[t.id])
                continue
            r = self.routes.get(t.id)
            tasks.append(
                pb.TaskStatus(
                    task_id=t.id,
                    algorithm=t.algorithm_name,
                    model_version=0 if r is None else r.model_version,
                    max_server_steps=t.max_server_steps,
                    finished=t.id in self.finished,
                    concurrency_target=t.concurrency,
                )
            )
        return pb.StatusResponse(tasks=tasks, uptime_s=self._clock() - self.started)
