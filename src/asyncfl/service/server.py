"""The gRPC server (grpc.aio): the wire side of the selector, aggregator and coordinator roles.

Every handler converts a :class:`~asyncfl.service.errors.ServiceError` into its catalog status
(with the reason code in trailing metadata) and anything unexpected into ``INTERNAL`` with a
fixed message, so no traceback or path reaches a client. Uploads are checked as far as possible
from their header before any data is received, and their size is bounded by the model's size,
so a hostile client cannot make the server allocate more than one model per upload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol

import grpc
import numpy as np

from asyncfl.secure.tee.client import MaskedUpdate
from asyncfl.secure.tee.messages import SealedSeed
from asyncfl.service import lightsecagg_wire, secagg_wire
from asyncfl.service.auth import AuthInterceptor, Secret, principal_of
from asyncfl.service.config import ServerSection, ServiceConfig
from asyncfl.service.coordinator import AssignmentInfo, Coordinator, TeeHeader, UploadHeaderInfo
from asyncfl.service.diagnostics import install_task_dump
from asyncfl.service.errors import REASON_KEY, ServiceError
from asyncfl.service.proto.asyncfl.v1 import service_pb2 as pb
from asyncfl.service.proto.asyncfl.v1 import service_pb2_grpc as pb_grpc

__all__ = [
    "ServiceHandle",
    "Servicer",
    "assignment_message",
    "bind",
    "grpc_options",
    "run_server",
    "start_server",
]

log = logging.getLogger("asyncfl.service.server")

Context = grpc.aio.ServicerContext[Any, Any]
_TICK_S = 0.2
_EMPTY = np.zeros(0, np.float32)


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Two servers on one port would split clients between two ledgers.
        ("grpc.so_reuseport", 0),
    ]


async def _fail(context: Context, err: ServiceError) -> NoReturn:
    log.info("refused", extra={"reason": err.reason, "detail": err.detail})
    context.set_trailing_metadata(((REASON_KEY, err.reason),))
    await context.abort(err.entry.code, err.entry.message)
    raise AssertionError("unreachable")  # pragma: no cover - abort raises


class Servicer(pb_grpc.FederatedLearningServicer):
    def __init__(self, coord: Coordinator, chunk_bytes: int) -> None:
        self.coord = coord
        self.chunk_values = chunk_bytes // 4

    def _client_id(self, context: Context) -> int:
        principal = principal_of(self.coord.secret, context.invocation_metadata())
        if principal is None or not principal.isdigit():  # the interceptor already refused it
            raise ServiceError("unauthenticated")
        return int(principal)

    async def CheckIn(self, request: pb.CheckInRequest, context: Context) -> pb.CheckInResponse:
        try:
            client = self._client_id(context)
            a = self.coord.check_in(client, request.num_examples, request.task_id)
        except ServiceError as err:
            if err.reason == "task_finished":
                return pb.CheckInResponse(done=True)
            await _fail(context, err)
        except Exception:
            log.exception("check-in failed")
            await _fail(context, ServiceError("internal"))
        groups = lightsecagg_wire.member_tasks(self.coord, client)
        if a is None:
            return pb.CheckInResponse(
                retry_after_s=self.coord.cfg.selector.retry_after_s, lightsecagg_tasks=groups
            )
        return pb.CheckInResponse(assignment=assignment_message(a), lightsecagg_tasks=groups)

    async def Locate(self, request: pb.LocateRequest, context: Context) -> pb.LocateResponse:
        try:
            self._client_id(context)
            self.coord.task(request.task_id)
        except ServiceError as err:
            await _fail(context, err)
        return pb.LocateResponse(aggregator_address="")  # served right here

    async def DownloadModel(
        self, request: pb.DownloadRequest, context: Context
    ) -> AsyncIterator[pb.ModelChunk]:
        try:
            self._client_id(context)
            rt = self.coord.task(request.task_id).runtime
        except ServiceError as err:
            await _fail(context, err)
        # One reference = one consistent version: steps replace the vector, never mutate it.
        params, version = rt.params(), rt.version
        raw = np.ascontiguousarray(params, dtype="<f4").data.cast("B")
        n, step = params.shape[0], self.chunk_values
        for start in range(0, max(n, 1), step):
            stop = min(start + step, n)
            yield pb.ModelChunk(
                model_version=version,
                model_dim=n,
                offset=start,
                data=bytes(raw[4 * start : 4 * stop]),
            )

    async def UploadUpdate(
        self, request_iterator: AsyncIterator[pb.UploadChunk], context: Context
    ) -> pb.UploadResponse:
        header: UploadHeaderInfo | None = None
        try:
            client = self._client_id(context)
            first = await anext(aiter(request_iterator), None)
            if not isinstance(first, pb.UploadChunk) or first.WhichOneof("part") != "header":
                raise ServiceError("malformed_message", "the first chunk must be the header")
            h = first.header
            tee = None
            if h.dtype in (pb.DTYPE_RING_U32, pb.DTYPE_RING_U64):
                s = h.sealed_seed
                tee = TeeHeader(
                    4 if h.dtype == pb.DTYPE_RING_U32 else 8,
                    h.tee_epoch,
                    SealedSeed(s.update_id, s.ephemeral_public, s.ciphertext),
                )
            header = UploadHeaderInfo(
                task_id=h.task_id,
                lease_id=h.lease_id,
                upload_id=h.upload_id,
                base_version=h.base_version,
                num_examples=h.num_examples,
                dim=h.dim,
                float32=h.dtype == pb.DTYPE_FLOAT32,
                tee=tee,
            )
            self.coord.check_upload(client, header)
            # The header is checked: dim equals the model's, so this allocation is bounded.
            width = 4 if tee is None else tee.ring_bytes
            buf = bytearray(width * header.dim)
            filled = 0
            async for chunk in request_iterator:
                if not isinstance(chunk, pb.UploadChunk) or chunk.WhichOneof("part") != "data":
                    raise ServiceError("malformed_message", "a second header")
                data = chunk.data
                if filled + len(data) > len(buf):
                    raise ServiceError("message_too_large", f"> {len(buf)} bytes")
                buf[filled : filled + len(data)] = data
                filled += len(data)
            if filled != len(buf):
                raise ServiceError("malformed_message", f"{filled} of {len(buf)} bytes")
            if tee is None:
                delta = np.frombuffer(buf, dtype="<f4").astype(np.float32, copy=False)
                res = await self.coord.submit(client, header, delta)
            else:
                ring = np.dtype(np.uint32 if tee.ring_bytes == 4 else np.uint64)
                masked = np.frombuffer(buf, dtype=ring.newbyteorder("<")).astype(ring)
                up = MaskedUpdate(
                    client, header.base_version, header.num_examples, tee.epoch, masked, tee.sealed
                )
                res = await self.coord.submit(client, header, _EMPTY, up)
        except ServiceError as err:
            if header is not None and err.reason in ("malformed_message", "message_too_large"):
                self.coord.release(header.task_id, header.lease_id)
            await _fail(context, err)
        except Exception:
            log.exception("upload failed")
            await _fail(context, ServiceError("internal"))
        return pb.UploadResponse(
            model_version=res.version,
            staleness=res.staleness,
            weight=res.weight,
            stepped=res.stepped,
        )

    async def SecAgg(self, request: pb.SecAggRequest, context: Context) -> pb.SecAggResponse:
        try:
            return await secagg_wire.handle_step(self.coord, self._client_id(context), request)
        except ServiceError as err:
            await _fail(context, err)
        except Exception:
            log.exception("secagg step failed")
            await _fail(context, ServiceError("internal"))

    async def SecAggMaskedInput(
        self, request_iterator: AsyncIterator[pb.SecAggInputChunk], context: Context
    ) -> pb.SecAggResponse:
        try:
            client = self._client_id(context)
            return await secagg_wire.handle_masked_input(self.coord, client, request_iterator)
        except ServiceError as err:
            await _fail(context, err)
        except Exception:
            log.exception("secagg masked input failed")
            await _fail(context, ServiceError("internal"))

    async def LightSecAggRegister(
        self, request: pb.LightSecAggRegisterRequest, context: Context
    ) -> pb.LightSecAggGroup:
        try:
            client = self._client_id(context)
            return await lightsecagg_wire.handle_register(self.coord, client, request)
        except ServiceError as err:
            await _fail(context, err)
        except Exception:
            log.exception("lightsecagg registration failed")
            await _fail(context, ServiceError("internal"))

    async def LightSecAggPoll(
        self, request: pb.LightSecAggPollRequest, context: Context
    ) -> AsyncIterator[pb.LightSecAggMailboxItem]:
        try:
            client = self._client_id(context)
            items = await lightsecagg_wire.handle_poll(self.coord, client, request)
        except ServiceError as err:
            await _fail(context, err)
        except Exception:
            log.exception("lightsecagg poll failed")
            await _fail(context, ServiceError("internal"))
        for item in items:
            yield item

    async def LightSecAggAnswer(
        self, request: pb.LightSecAggAnswerRequest, context: Context
    ) -> pb.LightSecAggAnswerResponse:
        try:
            client = self._client_id(context)
            return await lightsecagg_wire.handle_answer(self.coord, client, request)
        except ServiceError as err:
            await _fail(context, err)
        except Exception:
            log.exception("lightsecagg answer failed")
            await _fail(context, ServiceError("internal"))

    async def LightSecAggUpload(
        self, request_iterator: AsyncIterator[pb.LightSecAggUploadChunk], context: Context
    ) -> pb.UploadResponse:
        try:
            client = self._client_id(context)
            first = await anext(aiter(request_iterator), None)
            return await lightsecagg_wire.handle_upload(self.coord, client, first, request_iterator)
        except ServiceError as err:
            await _fail(context, err)
        except Exception:
            log.exception("lightsecagg upload failed")
            await _fail(context, ServiceError("internal"))

    async def Status(self, request: pb.StatusRequest, context: Context) -> pb.StatusResponse:
        coord = self.coord
        return pb.StatusResponse(
            uptime_s=coord._clock() - coord.started,
            tasks=[
                pb.TaskStatus(
                    task_id=s.task_id,
                    algorithm=s.algorithm,
                    model_version=s.version,
                    max_server_steps=s.max_server_steps,
                    finished=s.finished,
                    active_clients=s.active_clients,
                    concurrency_target=s.concurrency_target,
                    buffered=s.buffered,
                    accepted_updates=s.accepted_updates,
                    updates_per_s=s.updates_per_s,
                    rejected=s.rejected,
                    dp_enabled=s.epsilon is not None,
                    epsilon=s.epsilon or 0.0,
                    dp_delta=s.dp_delta,
                    epsilon_budget=s.epsilon_budget or 0.0,
                    budget_spent=s.budget_spent,
                    discarded_updates=s.discarded_updates,
                    secagg_rounds_applied=s.secagg_rounds_applied,
                    secagg_rounds_failed=s.secagg_rounds_failed,
                    secagg_dropouts=s.secagg_dropouts,
                )
                for s in coord.stats()
            ],
        )


def assignment_message(a: AssignmentInfo, aggregator_address: str = "") -> pb.Assignment:
    report = None
    if a.enclave_report is not None:
        r = a.enclave_report
        report = pb.EnclaveReport(
            measurement=r.measurement,
            public_key=r.public_key,
            epoch=r.epoch,
            signature=r.signature,
        )
    return pb.Assignment(
        task_id=a.task_id,
        lease_id=a.lease_id,
        model_version=a.version,
        model_dim=a.dim,
        lease_timeout_s=a.lease_timeout_s,
        client_config_json=a.client_config_json,
        model_config_json=a.model_config_json,
        clip_norm=a.clip_norm,
        enclave_report=report,
        enclave_config=a.enclave_config,
        aggregator_address=aggregator_address,
        secagg=None if a.secagg is None else secagg_wire.params_to_pb(a.secagg),
    )


@dataclass
class ServiceHandle:
    server: grpc.aio.Server
    coordinator: Coordinator
    port: int
    _ticker: asyncio.Task[None]

    async def stop(self, grace_s: float | None = 1.0) -> None:
        self._ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._ticker
        await self.server.stop(grace_s)
        await self.coordinator.flush()
        self.coordinator.close()


def bind(server: grpc.aio.Server, address: str, s: ServerSection) -> int:
    """Listen on ``address`` (TLS from ``s`` unless ``s.insecure``); return the bound port."""
    if s.insecure:
        return server.add_insecure_port(address)
    assert s.tls_cert is not None and s.tls_key is not None  # ServerSection.validate
    creds = grpc.ssl_server_credentials(
        [(Path(s.tls_key).read_bytes(), Path(s.tls_cert).read_bytes())]
    )
    return server.add_secure_port(address, creds)


async def _tick_forever(coord: Coordinator) -> None:
    while True:
        await asyncio.sleep(_TICK_S)
        try:
            await coord.tick()
        except Exception:  # a failed tick must not stop lease expiry for good
            log.exception("tick failed")


async def start_server(cfg: ServiceConfig) -> ServiceHandle:
    """Recover every task from ``cfg.storage.dir`` and start serving; returns when listening."""
    s = cfg.server
    if cfg.auth.secret_file is None:  # ServiceConfig.validate refuses this; keep mypy honest
        raise ValueError("auth.secret_file is required")
    secret = Secret.from_file(cfg.auth.secret_file)
    coord = Coordinator(cfg, secret)
    server = grpc.aio.server(
        interceptors=[AuthInterceptor(secret, cfg.auth.operator_principal)],
        options=grpc_options(s.max_message_bytes),
    )
    pb_grpc.add_FederatedLearningServicer_to_server(  # type: ignore[no-untyped-call]
        Servicer(coord, s.chunk_bytes), server
    )
    port = bind(server, f"{s.host}:{s.port}", s)
    await server.start()
    port_file = Path(cfg.storage.dir) / "port"
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(str(port))
    os.replace(tmp, port_file)
    log.info("serving", extra={"address": f"{s.host}:{port}", "tls": not s.insecure})
    return ServiceHandle(server, coord, port, asyncio.create_task(_tick_forever(coord)))


class _Stoppable(Protocol):
    async def stop(self, grace_s: float | None = 1.0) -> None: ...


def serve_until_signal(start: Callable[[], Awaitable[_Stoppable]]) -> None:
    """Start a server with ``start`` and run it until SIGINT/SIGTERM, then stop it gracefully."""

    async def main() -> None:
        install_task_dump()
        handle = await start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await handle.stop(2.0)

    asyncio.run(main())


def run_server(cfg: ServiceConfig) -> None:
    """Serve until SIGINT/SIGTERM (the CLI's ``asyncfl serve``)."""
    serve_until_signal(lambda: start_server(cfg))
