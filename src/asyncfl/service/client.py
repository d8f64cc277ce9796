"""The device-side runtime: check in, download, train, upload; retry and resume by itself.

The loop a device runs (Papaya's client)::

    check in ──► "retry after N s" ──► sleep N s (jittered) ─┐
       │  ▲                                                  │
       │  └──────────────────────────────────────────────────┘
       ▼
    assignment (task, lease, version) ─► download model ─► train ─► upload (one upload id)

Transient failures (server down, restarting, overloaded) are retried with exponential backoff
and full jitter (a random wait in ``[0, min(cap, base·2^n)]``) so a fleet reconnecting after a
server restart does not arrive in lock step. A retried upload reuses its upload id: if the
first attempt was committed before the connection broke, the server answers ALREADY_EXISTS and
the client counts it as accepted, never twice.

Training uses the simulator's :class:`~asyncfl.training.local.LocalTrainer` with the
hyperparameters the task sends, and the same seed derivation ``(seed, "train", client,
version)``. Plug in any model and ``(x, y)`` tensors with :class:`TorchTrainer`, or any callable
that follows :class:`Trainer`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import numpy as np
import torch

from asyncfl.core.configload import build_config
from asyncfl.core.update import FloatVector
from asyncfl.errors import AsyncFLError, CryptoError, ProtocolError
from asyncfl.models.config import ModelConfig
from asyncfl.privacy import clip_update
from asyncfl.secure.fixedpoint import FixedPointCodec
from asyncfl.secure.tee.attestation import enclave_code, measure, verify_report
from asyncfl.secure.tee.client import MaskedUpdate, TeeClient
from asyncfl.secure.tee.enclave import EnclaveConfig
from asyncfl.secure.tee.messages import AttestationReport
from asyncfl.service.auth import bearer_metadata
from asyncfl.service.config import is_loopback
from asyncfl.service.diagnostics import install_task_dump
from asyncfl.service.errors import REASON_KEY
from asyncfl.service.lightsecagg_client import (
    SOMEWHERE,
    LightSecAggBody,
    LightSecAggDevice,
    LightSecAggError,
    upload_chunks,
)
from asyncfl.service.proto.asyncfl.v1 import service_pb2 as pb
from asyncfl.service.proto.asyncfl.v1 import service_pb2_grpc as pb_grpc
from asyncfl.service.secagg_client import take_part
from asyncfl.service.tee import TeeTrust
from asyncfl.sim.seeding import derive_seed
from asyncfl.training.config import ClientConfig
from asyncfl.training.local import LocalTrainer

__all__ = [
    "ClientError",
    "ClientOptions",
    "ClientReport",
    "TeeTrust",
    "TorchTrainer",
    "TrainResult",
    "Trainer",
    "UploadRecord",
    "clip_for_task",
    "run_client",
    "run_client_async",
    "run_clients_async",
]

log = logging.getLogger("asyncfl.service.client")

_TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)
_FATAL = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})


class ClientError(AsyncFLError):
    """The client cannot go on (bad credentials, or the server kept failing)."""


@dataclass(frozen=True)
class ClientOptions:
    address: str
    """``host:port`` of the server."""
    token: str
    """Bearer token ``<client id>.<hmac>`` issued by the operator."""
    client_id: int
    num_examples: int
    """Examples this device holds (reported at check-in for eligibility)."""
    ca_cert: bytes | None = None
    """PEM root certificate to trust; None means plaintext (loopback servers only)."""
    task_id: str = ""
    """Join only this task (empty: whatever the server assigns)."""
    max_updates: int | None = None
    """Stop after this many accepted updates (None: until the task is done)."""
    seed: int = 0
    backoff_base_s: float = 0.1
    backoff_cap_s: float = 5.0
    max_failures: int = 60
    """Consecutive transient failures before the client gives up."""
    rpc_timeout_s: float = 60.0
    max_message_bytes: int = 4 << 20
    chunk_bytes: int = 1 << 20
    tee: TeeTrust | None = None
    """Trust anchor for ``secure_aggregation: tee`` tasks (vendor key, expected enclave
    measurement). Without it the client refuses such tasks; with it, it refuses any enclave
    whose report does not verify (:class:`ClientError`, nothing is sent)."""


@dataclass(frozen=True, eq=False)
class TrainResult:
    delta: FloatVector
    num_examples: int


class Trainer(Protocol):
    def __call__(self, params: FloatVector, version: int, assignment: pb.Assignment) -> TrainResult:
        """Train from ``params`` (model ``version``); return ``delta = start - end``."""
        ...


class TorchTrainer:
    """Local training with :class:`LocalTrainer` on one client's ``(x, y)``.

    The model is built from the task's model config on the first assignment unless ``model``
    is given (it must have the task's parameter count).
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        client_id: int,
        seed: int = 0,
        model: torch.nn.Module | None = None,
    ) -> None:
        self.x, self.y = x, y
        self.client_id = client_id
        self.seed = seed
        self._model = model
        self._trainer: LocalTrainer | None = None
        self._key: tuple[str, str] | None = None

    def _prepare(self, a: pb.Assignment) -> LocalTrainer:
        key = (a.client_config_json, a.model_config_json)
        if self._trainer is not None and key == self._key:
            return self._trainer
        ccfg = build_config(ClientConfig, json.loads(a.client_config_json))
        model = self._model
        if model is None:
            spec = json.loads(a.model_config_json)
            shape = tuple(int(d) for d in spec.pop("input_shape"))
            classes = int(spec.pop("num_classes"))
            mcfg = build_config(ModelConfig, spec)
            model = mcfg.build(shape, classes)
        self._trainer = LocalTrainer(model, ccfg)
        if self._trainer.spec.dim != a.model_dim:
            raise ClientError(
                f"local model has {self._trainer.spec.dim} parameters, task {a.task_id!r} "
                f"has {a.model_dim}: plug in the task's architecture"
            )
        self._key = key
        return self._trainer

    def __call__(self, params: FloatVector, version: int, assignment: pb.Assignment) -> TrainResult:
        trainer = self._prepare(assignment)
        seed = derive_seed(self.seed, "train", self.client_id, version)
        res = trainer.train(params, self.x, self.y, seed)
        return TrainResult(res.delta, res.num_examples)


@dataclass(frozen=True)
class UploadRecord:
    upload_id: str
    base_version: int
    outcome: str
    """``accepted``, ``duplicate`` (accepted by an earlier attempt), or a refusal reason."""
    attempts: int


@dataclass
class ClientReport:
    client_id: int
    accepted: int = 0
    refused: int = 0
    retries: int = 0
    done: bool = False
    uploads: list[UploadRecord] = field(default_factory=list)
    lightsecagg_held: list[int] = field(default_factory=list)
    """lightsecagg: for each mask share the device still holds at the end, the buffer of its
    contribution (-1: unknown). Shares of settled buffers are dropped at the next poll."""


class _Transient(Exception):
    pass


def attest_assignment(a: pb.Assignment, trust: TeeTrust | None) -> TeeClient | None:
    """For a tee task: verify the enclave's report and config, return the masking client.

    Checks, before anything is downloaded, trained or sent: (1) the report is signed by the
    vendor key the DEVICE is configured with; (2) its measurement is the one the device
    expects; (3) the enclave config sent along is exactly what that measurement covers, so
    the ring, fixed point and K the device encodes for are the attested ones; (4) the DP clip
    norm it will clip to (``clip_for_task``) is the attested one, to which the enclave's noise
    is calibrated. Raises :class:`ClientError` otherwise.
    """
    if not a.HasField("enclave_report"):
        return None
    if trust is None:
        raise ClientError(
            f"task {a.task_id!r} uses a TEE secure buffer: configure ClientOptions.tee with "
            "the vendor public key and the expected enclave measurement"
        )
    r = a.enclave_report
    report = AttestationReport(r.measurement, r.public_key, r.epoch, r.signature)
    try:
        verify_report(report, trust.vendor_public, trust.expected_measurement)
        if measure(enclave_code(), a.enclave_config) != trust.expected_measurement:
            raise ProtocolError("the enclave config sent is not the one measured")
        ec = EnclaveConfig.decode(a.enclave_config)
    except (CryptoError, ProtocolError) as exc:
        raise ClientError(f"enclave of task {a.task_id!r} refused: {exc}") from exc
    if ec.dim != a.model_dim or ec.task != a.task_id:
        raise ClientError(
            f"enclave config for task {ec.task!r} dim {ec.dim}; assignment is for "
            f"{a.task_id!r} dim {a.model_dim}"
        )
    if a.clip_norm != ec.dp_clip_norm:
        # DP: the device clips to the norm the attested noise is calibrated to; a server that
        # sent a larger one would weaken every user's guarantee, so a mismatch is refused.
        raise ClientError(
            f"task {a.task_id!r}: assignment clip_norm {a.clip_norm} is not the attested "
            f"enclave's {ec.dp_clip_norm}"
        )
    codec = FixedPointCodec(clip=ec.clip, frac_bits=ec.frac_bits, ring_bits=ec.ring_bits)
    return TeeClient(
        vendor_public=trust.vendor_public,
        expected=trust.expected_measurement,
        codec=codec,
        task=a.task_id,
        dim=ec.dim,
    )


def _reason(err: grpc.aio.AioRpcError) -> str:
    for key, value in err.trailing_metadata() or ():
        if key == REASON_KEY:
            return str(value)
    return err.code().name.lower()


class _Session:
    def __init__(self, opts: ClientOptions, trainer: Trainer, channel: grpc.aio.Channel) -> None:
        self.o = opts
        self.trainer = trainer
        self.stub = pb_grpc.FederatedLearningStub(channel)  # type: ignore[no-untyped-call]
        self.md = bearer_metadata(opts.token)
        self.rng = random.Random(derive_seed(opts.seed, "client_backoff", opts.client_id))
        self.report = ClientReport(opts.client_id)
        self.failures = 0
        self._aggregators: dict[str, tuple[grpc.aio.Channel, pb_grpc.FederatedLearningStub]] = {}
        self.lsa = LightSecAggDevice(opts.client_id)

    def _data_stub(self, address: str) -> pb_grpc.FederatedLearningStub:
        """The stub for an assignment's ``aggregator_address`` ("": the server checked in at)."""
        if not address:
            return self.stub
        if address not in self._aggregators:
            if self.o.ca_cert is None and not is_loopback(address.rpartition(":")[0].strip("[]")):
                # Plaintext is allowed to loopback only; a selector cannot widen that.
                raise ClientError(f"plaintext to aggregator {address!r} refused: give ca_cert")
            channel = _channel(self.o, address)
            stub = pb_grpc.FederatedLearningStub(channel)  # type: ignore[no-untyped-call]
            self._aggregators[address] = (channel, stub)
        return self._aggregators[address][1]

    async def _locate(self, task_id: str, current: str) -> str:
        """Where ``task_id`` is served now (its aggregator may have moved); ``current`` if the
        selector cannot say."""
        try:
            resp: pb.LocateResponse = await self.stub.Locate(
                pb.LocateRequest(task_id=task_id), metadata=self.md, timeout=self.o.rpc_timeout_s
            )
        except grpc.aio.AioRpcError:
            return current
        return resp.aggregator_address

    async def close(self) -> None:
        for channel, _ in self._aggregators.values():
            await channel.close()
        self._aggregators.clear()

    async def backoff(self) -> None:
        self.failures += 1
        self.report.retries += 1
        if self.failures > self.o.max_failures:
            raise ClientError(
                f"client {self.o.client_id}: {self.failures - 1} consecutive failures talking "
                f"to {self.o.address}; is the server running?"
            )
        cap = min(self.o.backoff_cap_s, self.o.backoff_base_s * 2 ** min(self.failures, 30))
        await asyncio.sleep(self.rng.uniform(0, cap))

    async def retry(self, err: grpc.aio.AioRpcError) -> str | None:
        """For a SecAgg round: None after backing off from a transient failure, else the
        refusal's reason (fatal errors raise ClientError)."""
        try:
            self._check(err)
        except _Transient:
            await self.backoff()
            return None
        return _reason(err)

    def ok(self) -> None:
        self.failures = 0

    async def secagg_round(self, a: pb.Assignment, version: int, res: TrainResult) -> UploadRecord:
        """secure_aggregation secagg/secagg+: the update goes into the round's masked sum."""
        outcome, session = await take_part(
            self,
            self._data_stub(a.aggregator_address),
            a,
            version,
            res.delta,
            res.num_examples,
            client_id=self.o.client_id,
            seed=self.o.seed,
            rpc_timeout_s=self.o.rpc_timeout_s,
            chunk_bytes=self.o.chunk_bytes,
        )
        return UploadRecord(f"secagg-{session}", version, outcome, 1)

    def _check(self, err: grpc.aio.AioRpcError) -> None:
        if err.code() in _FATAL:
            raise ClientError(f"client {self.o.client_id}: {err.code().name}: {err.details()}")
        if err.code() in _TRANSIENT:
            raise _Transient(err.code().name) from err

    async def check_in(self) -> pb.CheckInResponse:
        req = pb.CheckInRequest(num_examples=self.o.num_examples, task_id=self.o.task_id)
        while True:
            try:
                resp: pb.CheckInResponse = await self.stub.CheckIn(
                    req, metadata=self.md, timeout=self.o.rpc_timeout_s
                )
                self.failures = 0
                return resp
            except grpc.aio.AioRpcError as err:
                try:
                    self._check(err)
                except _Transient:
                    await self.backoff()
                    continue
                raise ClientError(f"check-in refused: {_reason(err)}") from err

    async def download(self, task_id: str, address: str = "") -> tuple[FloatVector, int]:
        call = self._data_stub(address).DownloadModel(
            pb.DownloadRequest(task_id=task_id), metadata=self.md, timeout=self.o.rpc_timeout_s
        )
        out: FloatVector | None = None
        version = -1
        async for chunk in call:
            if out is None:
                out = np.empty(chunk.model_dim, np.float32)
                version = chunk.model_version
            n = len(chunk.data) // 4
            if chunk.model_version != version or chunk.offset + n > out.shape[0]:
                raise _Transient("inconsistent model stream")
            out[chunk.offset : chunk.offset + n] = np.frombuffer(chunk.data, "<f4")
        if out is None:
            raise _Transient("empty model stream")
        return out, version

    async def _chunks(
        self, header: pb.UploadHeader, delta: FloatVector | MaskedUpdate
    ) -> AsyncIterator[pb.UploadChunk]:
        yield pb.UploadChunk(header=header)
        if isinstance(delta, MaskedUpdate):
            m = delta.masked
            raw = np.ascontiguousarray(m, dtype=m.dtype.newbyteorder("<")).data.cast("B")
        else:
            raw = np.ascontiguousarray(delta, dtype="<f4").data.cast("B")
        step = self.o.chunk_bytes
        for start in range(0, len(raw), step):
            yield pb.UploadChunk(data=bytes(raw[start : start + step]))

    def mask(
        self, a: pb.Assignment, tee: TeeClient, version: int, res: TrainResult
    ) -> MaskedUpdate:
        """Encode, mask with a fresh seed and seal it to the attested enclave (on the device)."""
        r = a.enclave_report
        report = AttestationReport(r.measurement, r.public_key, r.epoch, r.signature)
        # Stochastic rounding of the fixed-point encoding; masks come from the OS CSPRNG.
        rng = np.random.default_rng(
            derive_seed(self.o.seed, "tee_round", self.o.client_id, version)
        )
        try:
            return tee.upload(
                report,
                client_id=self.o.client_id,
                base_version=version,
                num_examples=res.num_examples,
                delta=res.delta,
                rng=rng,
            )
        except (CryptoError, ProtocolError, ValueError) as exc:
            raise ClientError(f"cannot mask the update for task {a.task_id!r}: {exc}") from exc

    async def upload(
        self, a: pb.Assignment, version: int, res: TrainResult, tee: TeeClient | None = None
    ) -> UploadRecord:
        # From the OS CSPRNG, not the seeded jitter stream: a restarted client (same seed and
        # id) would repeat that stream's ids, and its new updates would be answered
        # "duplicate" (counted as accepted, never applied).
        upload_id = uuid.uuid4().hex
        header = pb.UploadHeader(
            task_id=a.task_id,
            lease_id=a.lease_id,
            upload_id=upload_id,
            base_version=version,
            num_examples=res.num_examples,
            dim=int(res.delta.shape[0]),
            dtype=pb.DTYPE_FLOAT32,
        )
        body: FloatVector | MaskedUpdate = res.delta
        lsa = await self.lightsecagg_body(a, version, res)
        lsa_header = pb.LightSecAggUploadHeader(
            task_id=a.task_id,
            lease_id=a.lease_id,
            upload_id=upload_id,
            base_version=version,
            num_examples=res.num_examples,
            dim=int(res.delta.shape[0]),
            contribution_seq=0 if lsa is None else lsa.seq,
        )
        if tee is not None:
            body = self.mask(a, tee, version, res)
            header.dtype = (
                pb.DTYPE_RING_U32 if body.masked.dtype.itemsize == 4 else pb.DTYPE_RING_U64
            )
            header.tee_epoch = body.epoch
            header.sealed_seed.update_id = body.sealed.update_id
            header.sealed_seed.ephemeral_public = body.sealed.ephemeral_public
            header.sealed_seed.ciphertext = body.sealed.ciphertext
        attempts = 0
        address = a.aggregator_address
        while True:
            attempts += 1
            try:
                if lsa is not None:
                    resp: pb.UploadResponse = await self._data_stub(address).LightSecAggUpload(
                        upload_chunks(lsa_header, lsa, self.o.client_id, self.o.chunk_bytes),
                        metadata=self.md,
                        timeout=self.o.rpc_timeout_s,
                    )
                    self.lsa.uploaded(a.task_id, lsa.seq, int(resp.lightsecagg_buffer_id))
                else:
                    await self._data_stub(address).UploadUpdate(
                        self._chunks(header, body), metadata=self.md, timeout=self.o.rpc_timeout_s
                    )
                self.failures = 0
                return UploadRecord(upload_id, version, "accepted", attempts)
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.ALREADY_EXISTS:
                    self.failures = 0
                    if lsa is not None:  # an earlier attempt committed it: buffer unknown
                        self.lsa.uploaded(a.task_id, lsa.seq, SOMEWHERE)
                    return UploadRecord(upload_id, version, "duplicate", attempts)
                try:
                    self._check(err)
                except _Transient:
                    if _reason(err) == "message_too_large":
                        raise
                    await self.backoff()
                    if address:  # roles in separate processes: the task may have moved
                        address = await self._locate(a.task_id, address)
                    continue
                self.failures = 0
                if lsa is not None:  # refused: no buffer holds it, none will ask for it
                    self.lsa.uploaded(a.task_id, lsa.seq, None)
                return UploadRecord(upload_id, version, _reason(err), attempts)

    async def lightsecagg(self, task_ids: Sequence[str], addresses: Mapping[str, str]) -> None:
        """lightsecagg groups this client belongs to: register, poll, answer, each at the
        aggregator ``addresses`` names for the task (none: the server checked in at)."""
        try:
            await self.lsa.serve(
                lambda t: self._data_stub(addresses.get(t, "")),
                self.md,
                task_ids,
                self.o.rpc_timeout_s,
            )
        except grpc.aio.AioRpcError as err:
            raise ClientError(f"lightsecagg refused: {err.code().name}") from err
        except LightSecAggError as exc:
            raise ClientError(str(exc)) from exc

    async def lightsecagg_body(
        self, a: pb.Assignment, version: int, res: TrainResult
    ) -> LightSecAggBody | None:
        """lightsecagg task: encode, mask and code the mask's shares (None otherwise)."""
        if not self.lsa.ready(a.task_id):
            return None
        rng = np.random.default_rng(
            derive_seed(self.o.seed, "lightsecagg_round", self.o.client_id, version)
        )
        try:
            return await self.lsa.contribution(a.task_id, res.delta, version, res.num_examples, rng)
        except (ProtocolError, ValueError) as exc:
            raise ClientError(f"cannot mask the update for task {a.task_id!r}: {exc}") from exc

    async def run(self) -> ClientReport:
        r = self.report
        while self.o.max_updates is None or r.accepted < self.o.max_updates:
            resp = await self.check_in()
            kind = resp.WhichOneof("outcome")
            if kind == "done":
                r.done = True
                break
            if resp.lightsecagg_tasks:
                await self.lightsecagg(resp.lightsecagg_tasks, resp.lightsecagg_addresses)
                if (
                    kind == "assignment"
                    and not self.lsa.ready(resp.assignment.task_id)
                    and (resp.assignment.task_id in resp.lightsecagg_tasks)
                ):
                    await self.backoff()  # setup failed transiently; the lease will expire
                    continue
            if kind != "assignment":
                wait = max(0.0, min(resp.retry_after_s, 60.0))
                await asyncio.sleep(wait * self.rng.uniform(0.5, 1.5))
                continue
            a = resp.assignment
            tee = attest_assignment(a, self.o.tee)  # refuses before any download or training
            try:
                params, version = await self.download(a.task_id, a.aggregator_address)
            except grpc.aio.AioRpcError as err:
                if err.code() in _FATAL:
                    raise ClientError(f"download refused: {err.code().name}") from err
                await self.backoff()  # transient, or the task vanished: check in again
                continue
            except _Transient:
                await self.backoff()
                continue
            res = clip_for_task(await asyncio.to_thread(self.trainer, params, version, a), a)
            if a.HasField("secagg"):
                rec = await self.secagg_round(a, version, res)
            else:
                rec = await self.upload(a, version, res, tee)
            r.uploads.append(rec)
            if rec.outcome in ("accepted", "duplicate"):
                r.accepted += 1
            else:
                r.refused += 1
                log.info(
                    "upload refused", extra={"client": self.o.client_id, "reason": rec.outcome}
                )
        r.lightsecagg_held = self.lsa.held_buffers()
        return r


def clip_for_task(res: TrainResult, a: pb.Assignment) -> TrainResult:
    """User-level DP: clip the update on the device to the assignment's ``clip_norm``.

    Clipping here, before the update leaves the device, is what bounds one user's influence
    (the server clips again, so a client that skips this gains nothing). A delta that is not
    a finite 1-D float32 vector is left for the server to refuse.
    """
    if a.clip_norm <= 0:
        return res
    try:
        clipped, _ = clip_update(res.delta, a.clip_norm)
    except ValueError:
        return res
    return TrainResult(clipped, res.num_examples)


def _channel(opts: ClientOptions, address: str | None = None) -> grpc.aio.Channel:
    """A channel to ``address`` (default ``opts.address``) with the client's TLS trust."""
    address = opts.address if address is None else address
    options = [
        ("grpc.max_receive_message_length", opts.max_message_bytes),
        ("grpc.max_send_message_length", opts.max_message_bytes),
        # Reconnect quickly after a server restart (the default backoff reaches minutes).
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]
    if opts.ca_cert is None:
        return grpc.aio.insecure_channel(address, options=options)
    creds = grpc.ssl_channel_credentials(root_certificates=opts.ca_cert)
    return grpc.aio.secure_channel(address, creds, options=options)


async def run_client_async(opts: ClientOptions, trainer: Trainer) -> ClientReport:
    """Run one client until its task is done or ``max_updates`` are accepted."""
    async with _channel(opts) as channel:
        session = _Session(opts, trainer, channel)
        try:
            return await session.run()
        finally:
            await session.close()


async def run_clients_async(
    clients: Sequence[tuple[ClientOptions, Trainer]],
) -> list[ClientReport]:
    """Several clients in one process (one event loop; training runs in worker threads).
    ``kill -USR1`` prints every client's task stack to stderr."""
    install_task_dump()
    return list(await asyncio.gather(*(run_client_async(o, t) for o, t in clients)))


def run_client(opts: ClientOptions, trainer: Trainer) -> ClientReport:
    """Blocking form of :func:`run_client_async`."""
    return asyncio.run(run_client_async(opts, trainer))
