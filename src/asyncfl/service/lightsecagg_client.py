"""The device side of ``secure_aggregation: lightsecagg`` tasks (So et al. 2021; MLSys 2022).

A device belongs to a task's group when the server lists the task in a check-in answer
(``lightsecagg_tasks``). On every check-in it then, for each such task, at the server that
serves the task's group (``lightsecagg_addresses``: with roles in separate processes, the
task's aggregator; otherwise the server checked in at):

1. registers its X25519 public key (made on first sight of the task, kept for the life of
   this process) until the answer carries the complete key directory, then builds its
   :class:`~asyncfl.secure.lightsecagg.LightSecAggUser` from the group's parameters;
2. polls its mailbox: keeps (decrypts) the coded shares of other members' contributions and
   answers each request for its aggregated share (the user state machine refuses a request
   for fewer than K contributions, for one it already aggregated, or for one it holds no
   share of: those are the device's defences against a curious server);
3. for an assignment of the task, after training: fixed-point encodes the update into
   ``F_p``, draws a fresh mask, Lagrange-codes and encrypts its shares to the other members,
   and uploads the shares and ``x + z mod p`` (``LightSecAggUpload``).

Keys, masks and padding come from the OS CSPRNG (the user machine's default); stochastic
rounding from the session's seeded generator. A device whose process restarts loses its key
and its held shares: the server refuses a second key for the same client (``key_conflict``),
so such a device cannot rejoin the group and counts as a dropout (docs/service.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from asyncfl.core.update import FloatVector
from asyncfl.errors import AsyncFLError, ConfigError, CryptoError, ProtocolError
from asyncfl.secure.crypto import KeyPair
from asyncfl.secure.lightsecagg import (
    AggregateRequest,
    ContributionId,
    EncryptedMaskShare,
    FieldCodec,
    KeyDirectory,
    LightSecAggParams,
    LightSecAggUser,
)
from asyncfl.secure.lightsecagg.user import share_to_bytes
from asyncfl.service.errors import REASON_KEY
from asyncfl.service.proto.asyncfl.v1 import service_pb2 as pb
from asyncfl.service.proto.asyncfl.v1 import service_pb2_grpc as pb_grpc

__all__ = [
    "SOMEWHERE",
    "LightSecAggBody",
    "LightSecAggDevice",
    "LightSecAggError",
    "upload_chunks",
]

log = logging.getLogger("asyncfl.service.client")

_MIN_CONTRIBUTIONS = 2
"""The device's own floor on K: a server asking it to unmask "buffers" of one contribution
would learn that contribution. Refused whatever the server's parameters say."""
_GIVE_UP = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})


SOMEWHERE = -1
"""The buffer of a contribution an earlier attempt committed (a retried upload answered
"duplicate"): resolved to the open buffer of the next poll, an upper bound."""


class LightSecAggError(AsyncFLError):
    """The device cannot take part in a task's group (bad parameters or directory)."""


@dataclass(frozen=True, eq=False)
class LightSecAggBody:
    """One contribution ready to upload."""

    seq: int
    shares: tuple[tuple[int, bytes], ...]
    masked: np.ndarray


@dataclass
class _Task:
    keys: KeyPair
    user: LightSecAggUser | None = None
    codec: FieldCodec | None = None
    after_seq: int = 0
    unsent: list[tuple[int, bytes]] = field(default_factory=list)
    """Aggregated shares computed but not delivered (transient failure): sent again."""
    held_in: dict[ContributionId, int] = field(default_factory=dict)
    """The buffer each held share's contribution is in (dropped once it settles)."""


class LightSecAggDevice:
    """One device's state in every lightsecagg task it belongs to."""

    def __init__(self, client_id: int) -> None:
        self.client_id = client_id
        self._tasks: dict[str, _Task] = {}
        self.answers_sent = 0
        self.requests_refused = 0
        self.shares_refused = 0
        self.shares_forgotten = 0

    def ready(self, task_id: str) -> bool:
        """The group is complete and this device can contribute to ``task_id``."""
        t = self._tasks.get(task_id)
        return t is not None and t.user is not None

    async def serve(
        self,
        stub_for: Callable[[str], pb_grpc.FederatedLearningStub],
        metadata: Sequence[tuple[str, str]],
        task_ids: Sequence[str],
        timeout_s: float,
    ) -> None:
        """Register, poll and answer for each task (one check-in's worth) at ``stub_for(task)``
        (the server serving the task's group: with roles in separate processes, its
        aggregator). Transient RPC failures are left for the next check-in; raises
        :class:`LightSecAggError` when the device must not take part,
        ``grpc.aio.AioRpcError`` on bad credentials."""
        for task_id in task_ids:
            try:
                stub = stub_for(task_id)
                t = self._tasks.get(task_id)
                if t is None:
                    t = self._tasks[task_id] = _Task(KeyPair.generate())
                if t.user is None:
                    await self._register(stub, metadata, task_id, t, timeout_s)
                if t.user is not None:
                    await self._poll(stub, metadata, task_id, t, timeout_s)
            except grpc.aio.AioRpcError as err:
                if err.code() in _GIVE_UP:
                    raise
                log.info(
                    "lightsecagg call failed; retried at the next check-in",
                    extra={"client": self.client_id, "task": task_id, "reason": _reason(err)},
                )

    async def _register(
        self,
        stub: pb_grpc.FederatedLearningStub,
        md: Sequence[tuple[str, str]],
        task_id: str,
        t: _Task,
        timeout_s: float,
    ) -> None:
        req = pb.LightSecAggRegisterRequest(task_id=task_id, public_key=t.keys.public)
        g: pb.LightSecAggGroup = await stub.LightSecAggRegister(req, metadata=md, timeout=timeout_s)
        try:
            prm = LightSecAggParams(
                g.num_users, g.privacy_threshold, g.target_survivors, g.dim, g.min_contributions
            )
            codec = FieldCodec(clip=g.clip, frac_bits=g.frac_bits)
        except ConfigError as exc:
            raise LightSecAggError(f"task {task_id!r}: unusable group parameters: {exc}") from exc
        if prm.min_contributions < _MIN_CONTRIBUTIONS or not 0 <= self.client_id < prm.num_users:
            raise LightSecAggError(
                f"task {task_id!r}: K={prm.min_contributions} (this device needs >= "
                f"{_MIN_CONTRIBUTIONS}) or client {self.client_id} outside the group of "
                f"{prm.num_users}"
            )
        if len(g.public_keys) != prm.num_users:
            return  # not every member registered yet
        user = LightSecAggUser(prm, self.client_id, bytes(g.session_id), keys=t.keys)
        try:
            user.on_directory(KeyDirectory(bytes(g.session_id), tuple(g.public_keys)))
        except ProtocolError as exc:
            raise LightSecAggError(f"task {task_id!r}: key directory refused: {exc}") from exc
        t.user, t.codec = user, codec

    async def _poll(
        self,
        stub: pb_grpc.FederatedLearningStub,
        md: Sequence[tuple[str, str]],
        task_id: str,
        t: _Task,
        timeout_s: float,
    ) -> None:
        user = t.user
        assert user is not None
        await self._send(stub, md, task_id, t, timeout_s)
        call = stub.LightSecAggPoll(
            pb.LightSecAggPollRequest(task_id=task_id, after_seq=t.after_seq),
            metadata=md,
            timeout=timeout_s,
        )
        async for item in call:
            kind = item.WhichOneof("item")
            if kind == "settled":
                st = item.settled
                for c, b in t.held_in.items():
                    if b == SOMEWHERE:  # committed before this poll: in `open` or earlier
                        t.held_in[c] = int(st.open)
                settled = [c for c, b in t.held_in.items() if b < st.below]
                self.shares_forgotten += user.forget(settled)  # answered ones are gone already
                for c in settled:
                    del t.held_in[c]
                continue  # not a mailbox item: nothing to acknowledge
            if kind == "share":
                s = item.share
                cid = ContributionId(int(s.sender), int(s.contribution_seq))
                try:  # one at a time: a bad share (a lying sender) spoils only itself
                    user.on_shares([EncryptedMaskShare(cid, self.client_id, bytes(s.ciphertext))])
                except (ProtocolError, CryptoError) as exc:
                    self.shares_refused += 1
                    log.info("share refused", extra={"client": self.client_id, "detail": str(exc)})
                else:
                    t.held_in[cid] = int(s.buffer_id)
            elif kind == "request":
                r = item.request
                try:
                    cids = tuple(
                        ContributionId(int(a), int(b))
                        for a, b in zip(r.senders, r.seqs, strict=True)
                    )
                    req = AggregateRequest(
                        user.session_id, int(r.buffer_id), cids, tuple(int(w) for w in r.weights)
                    )
                    share = await asyncio.to_thread(user.on_aggregate_request, req)
                except (ProtocolError, ValueError) as exc:
                    self.requests_refused += 1
                    log.info(
                        "aggregate request refused",
                        extra={"client": self.client_id, "detail": str(exc)},
                    )
                else:
                    t.unsent.append((share.buffer_id, share_to_bytes(share.share)))
            t.after_seq = int(item.seq)
        await self._send(stub, md, task_id, t, timeout_s)

    async def _send(
        self,
        stub: pb_grpc.FederatedLearningStub,
        md: Sequence[tuple[str, str]],
        task_id: str,
        t: _Task,
        timeout_s: float,
    ) -> None:
        while t.unsent:
            bid, raw = t.unsent[0]
            try:
                await stub.LightSecAggAnswer(
                    pb.LightSecAggAnswerRequest(task_id=task_id, buffer_id=bid, share=raw),
                    metadata=md,
                    timeout=timeout_s,
                )
                self.answers_sent += 1
            except grpc.aio.AioRpcError as err:
                if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise  # kept in `unsent`: sent again at the next check-in
                # Settled already (unknown_buffer), or delivered by an earlier attempt
                # (duplicate): nothing left to do for this answer.
                log.info(
                    "answer not taken",
                    extra={"client": self.client_id, "buffer": bid, "reason": _reason(err)},
                )
            t.unsent.pop(0)

    async def contribution(
        self,
        task_id: str,
        delta: FloatVector,
        base_version: int,
        num_examples: int,
        rng: np.random.Generator,
    ) -> LightSecAggBody:
        """Encode, mask with a fresh mask and code its shares (off the event loop)."""
        t = self._tasks[task_id]
        user, codec = t.user, t.codec
        assert user is not None and codec is not None  # ready(task_id)

        def work() -> LightSecAggBody:
            x = codec.encode(delta, rng)
            msg = user.prepare_mask()
            up = user.upload(
                msg.contribution, x, base_version=base_version, num_examples=num_examples
            )
            shares = tuple((s.receiver, s.ciphertext) for s in msg.shares)
            return LightSecAggBody(msg.contribution.seq, shares, up.masked)

        return await asyncio.to_thread(work)

    def held_buffers(self) -> list[int]:
        """For every mask share held, in every task: its contribution's buffer (-1 unknown)."""
        return sorted(
            t.held_in.get(c, -1)
            for t in self._tasks.values()
            if t.user is not None
            for c in t.user.held
        )

    def uploaded(self, task_id: str, seq: int, buffer_id: int | None) -> None:
        """The fate of this device's contribution ``seq``: in buffer ``buffer_id`` (its own
        mask share is dropped once that buffer settles), committed by an earlier attempt
        (:data:`SOMEWHERE`: its buffer is at most the open one of the next poll), or refused
        (``None``: dropped now, no buffer will ever ask for it)."""
        t = self._tasks.get(task_id)
        if t is None or t.user is None:
            return
        cid = ContributionId(self.client_id, seq)
        if buffer_id is None:
            self.shares_forgotten += t.user.forget([cid])
        else:
            t.held_in[cid] = buffer_id


async def upload_chunks(
    header: pb.LightSecAggUploadHeader, body: LightSecAggBody, sender: int, chunk_bytes: int
) -> AsyncIterator[pb.LightSecAggUploadChunk]:
    yield pb.LightSecAggUploadChunk(header=header)
    for receiver, ct in body.shares:
        share = pb.LightSecAggShare(
            sender=sender, contribution_seq=body.seq, receiver=receiver, ciphertext=ct
        )
        yield pb.LightSecAggUploadChunk(share=share)
    raw = body.masked.astype("<u4").tobytes()
    for start in range(0, len(raw), chunk_bytes):
        yield pb.LightSecAggUploadChunk(data=raw[start : start + chunk_bytes])


def _reason(err: grpc.aio.AioRpcError) -> str:
    for key, value in err.trailing_metadata() or ():
        if key == REASON_KEY:
            return str(value)
    return err.code().name.lower()
