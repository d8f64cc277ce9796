"""The device side of a SecAgg / SecAgg+ round (``secure_aggregation`` secagg or secagg+).

After training, instead of uploading its update, the device takes part in its round:

1. join (its example count) and wait for the round's participants, session and weight;
2. derive the round's protocol config ITSELF from the task's public parameters and the
   participant list (:func:`~asyncfl.service.secagg_round.round_config`), so the server
   cannot impose a lower threshold; the sans-I/O :class:`SecAggClient` then checks every
   server message (threshold of live holders, session, addressing, authenticated shares);
3. advertise two fresh X25519 public keys; Shamir-share its self-mask seed and mask key
   and encrypt the shares to its neighbours; upload its fixed-point update (clipped,
   times its integer weight; plus its distributed-DP noise share if the task has DP)
   double-masked, in chunks; answer the unmask request.

Each call is retried on transient failures with the session's backoff until the stage's
time is up (``2 x stage_timeout_s`` plus slack from when the device entered it; the round
itself waits at most ``lease_timeout_s`` for its participants). A retried request is the
same bytes, so a server that already holds it treats it as a poll; "not yet" answers are
polled again at once (the server holds each call a few seconds).

The update never leaves the device unmasked; keys and masks come from the OS CSPRNG.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import grpc
import numpy as np

from asyncfl.core.update import FloatVector
from asyncfl.errors import ConfigError, ProtocolError
from asyncfl.privacy.noise import gaussian_noise, make_noise_source
from asyncfl.secure.secagg import SecAggClient, Stage
from asyncfl.secure.secagg.config import SESSION_BYTES
from asyncfl.secure.secagg.messages import (
    EncryptedShare,
    KeyBroadcast,
    PublicKeys,
    ShareBroadcast,
    UnmaskRequest,
)
from asyncfl.service.proto.asyncfl.v1 import service_pb2 as pb
from asyncfl.service.proto.asyncfl.v1 import service_pb2_grpc as pb_grpc
from asyncfl.service.secagg_round import MAX_CLIENT_ID, round_config
from asyncfl.service.secagg_wire import STAGE_TO_PB, params_from_pb
from asyncfl.sim.seeding import derive_seed

__all__ = ["SecAggLink", "take_part"]

_STAGE_SLACK_S = 10.0
"""Beyond 2 x stage_timeout_s: the server long-polls each call up to 5 s."""


class SecAggLink(Protocol):
    """What the client session lends a round: auth metadata and its retry policy."""

    md: tuple[tuple[str, str], ...]

    async def retry(self, err: grpc.aio.AioRpcError) -> str | None:
        """Transient: back off and return None (try again). Otherwise the refusal's reason.
        Raises for errors that end the client (bad credentials, too many failures)."""
        ...

    def ok(self) -> None:
        """A call went through (resets the consecutive-failure count)."""
        ...


class _Refused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Round:
    def __init__(
        self,
        link: SecAggLink,
        stub: pb_grpc.FederatedLearningStub,
        a: pb.Assignment,
        rpc_timeout_s: float,
        chunk_bytes: int,
    ) -> None:
        self.link = link
        self.stub = stub
        self.a = a
        self.rpc_timeout_s = rpc_timeout_s
        self.chunk_bytes = chunk_bytes
        self.session = b""

    async def _unary(self, req: pb.SecAggRequest) -> pb.SecAggResponse:
        resp: pb.SecAggResponse = await self.stub.SecAgg(
            req, metadata=self.link.md, timeout=self.rpc_timeout_s
        )
        return resp

    async def exchange(
        self,
        send: Callable[[], Awaitable[pb.SecAggResponse]],
        sent: Stage | None,
        budget_s: float,
        want: str,
    ) -> pb.SecAggResponse:
        """Send (retrying transient failures), then poll until the answer is ``want``."""
        loop = asyncio.get_running_loop()
        until = loop.time() + budget_s
        delivered = False
        while True:
            try:
                if delivered:
                    resp = await self._unary(
                        pb.SecAggRequest(
                            task_id=self.a.task_id,
                            lease_id=self.a.lease_id,
                            session_id=self.session,
                            poll=STAGE_TO_PB[sent],  # type: ignore[arg-type]
                        )
                    )
                else:
                    resp = await send()
                self.link.ok()
            except grpc.aio.AioRpcError as err:
                reason = await self.link.retry(err)
                if reason is not None:
                    raise _Refused(reason) from None
                if loop.time() > until:
                    raise _Refused("stage_timeout") from None
                continue
            delivered = True
            kind = resp.WhichOneof("outcome")
            if kind == want:
                return resp
            if kind != "retry_after_s":
                raise _Refused("protocol")  # the server answered out of turn
            if loop.time() > until:
                raise _Refused("stage_timeout")
            await asyncio.sleep(min(max(resp.retry_after_s, 0.0), 5.0))

    def request(self, **body: object) -> Callable[[], Awaitable[pb.SecAggResponse]]:
        req = pb.SecAggRequest(
            task_id=self.a.task_id,
            lease_id=self.a.lease_id,
            session_id=self.session,
            **body,  # type: ignore[arg-type]
        )
        return lambda: self._unary(req)

    def masked(self, masked: np.ndarray) -> Callable[[], Awaitable[pb.SecAggResponse]]:
        dtype = pb.DTYPE_RING_U32 if masked.dtype.itemsize == 4 else pb.DTYPE_RING_U64
        header = pb.SecAggInputHeader(
            task_id=self.a.task_id,
            lease_id=self.a.lease_id,
            session_id=self.session,
            dim=int(masked.shape[0]),
            dtype=dtype,
        )
        raw = np.ascontiguousarray(masked, dtype=masked.dtype.newbyteorder("<")).tobytes()
        step = self.chunk_bytes

        async def chunks() -> AsyncIterator[pb.SecAggInputChunk]:
            yield pb.SecAggInputChunk(header=header)
            for start in range(0, len(raw), step):
                yield pb.SecAggInputChunk(data=raw[start : start + step])

        async def send() -> pb.SecAggResponse:
            resp: pb.SecAggResponse = await self.stub.SecAggMaskedInput(
                chunks(), metadata=self.link.md, timeout=self.rpc_timeout_s
            )
            return resp

        return send


async def take_part(
    link: SecAggLink,
    stub: pb_grpc.FederatedLearningStub,
    a: pb.Assignment,
    version: int,
    delta: FloatVector,
    num_examples: int,
    *,
    client_id: int,
    seed: int = 0,
    rpc_timeout_s: float = 60.0,
    chunk_bytes: int = 1 << 20,
    entropy: Callable[[int], bytes] = os.urandom,
) -> tuple[str, str]:
    """Take part in the round of assignment ``a`` with update ``delta`` (already clipped for
    DP if the task asks). Returns ``(outcome, session hex)``: outcome ``accepted`` when the
    round's sum (with this update in it) was applied, else why not (a catalog reason,
    ``stage_timeout`` or ``protocol``)."""
    r = _Round(link, stub, a, rpc_timeout_s, chunk_bytes)
    try:
        return await _run(
            r, version, delta, num_examples, client_id, seed, entropy
        ), r.session.hex()
    except _Refused as exc:
        return exc.reason, r.session.hex()


async def _run(
    r: _Round,
    version: int,
    delta: FloatVector,
    num_examples: int,
    client_id: int,
    seed: int,
    entropy: Callable[[int], bytes],
) -> str:
    a = r.a
    try:
        params = params_from_pb(a.secagg)
    except ValueError:
        return "protocol"
    dim = int(a.model_dim)
    if delta.shape != (dim,) or not 0 <= client_id <= MAX_CLIENT_ID:
        return "bad_shape" if delta.shape != (dim,) else "ineligible"
    x = delta.astype(np.float32)
    if params.noise_std > 0:
        # Distributed DP: this device's share of the step's noise, from the OS CSPRNG (the
        # server must not be able to predict, hence subtract, it).
        noise = gaussian_noise(dim, params.noise_std, make_noise_source("secure"))
        x = (x + noise).astype(np.float32)
    stage_s = 2 * params.stage_timeout_s + _STAGE_SLACK_S

    resp = await r.exchange(
        r.request(join=pb.SecAggJoin(num_examples=num_examples)),
        None,
        a.lease_timeout_s + _STAGE_SLACK_S,
        "round",
    )
    info = resp.round
    participants = tuple(int(p) for p in info.participants)
    codec = params.codec
    if (
        len(info.session_id) != SESSION_BYTES
        or info.model_version != version
        or client_id not in participants
        or len(set(participants)) != len(participants)
        or not 1 <= info.weight <= min(params.max_weight, codec.max_total_weight())
    ):
        return "protocol"
    r.session = bytes(info.session_id)
    try:
        config = round_config(params, dim, participants, r.session, int(info.graph_seed))
        machine = SecAggClient(client_id, config, entropy)
    except (ConfigError, ProtocolError):
        return "protocol"
    # Stochastic rounding to fixed point (unbiased); reproducible per (client, version).
    rng = np.random.default_rng(derive_seed(seed, "secagg_round", client_id, version))
    encoded = codec.encode(x, int(info.weight), rng)

    try:
        adv = machine.advertise_keys()
        keys = pb.SecAggKeys(c_pk=adv.keys.c_pk, s_pk=adv.keys.s_pk)
        resp = await r.exchange(
            r.request(advertise_keys=keys), Stage.ADVERTISE_KEYS, stage_s, "key_broadcast"
        )
        kb = KeyBroadcast(
            r.session,
            client_id,
            tuple(
                (int(k.client_id), PublicKeys(bytes(k.c_pk), bytes(k.s_pk)))
                for k in resp.key_broadcast.keys
            ),
        )
        shares = machine.share_keys(kb)
        out = pb.SecAggShares(
            shares=[
                pb.SecAggCiphertext(peer=e.receiver, ciphertext=e.ciphertext) for e in shares.shares
            ]
        )
        resp = await r.exchange(
            r.request(share_keys=out), Stage.SHARE_KEYS, stage_s, "share_broadcast"
        )
        sb = ShareBroadcast(
            r.session,
            client_id,
            tuple(
                EncryptedShare(int(c.peer), client_id, bytes(c.ciphertext))
                for c in resp.share_broadcast.shares
            ),
        )
        masked = machine.masked_input(sb, encoded)
        resp = await r.exchange(
            r.masked(masked.masked), Stage.MASKED_INPUT, stage_s, "unmask_request"
        )
        ur = resp.unmask_request
        req = UnmaskRequest(
            r.session,
            client_id,
            frozenset(int(u) for u in ur.survivors),
            frozenset(int(u) for u in ur.dropped),
        )
        ans = machine.unmask(req)
    except ProtocolError:
        # The device refused a server message (too few live holders, a request that would
        # reveal an input, a tampered share): it stops here and reveals nothing more.
        return "protocol"
    unmask = pb.SecAggUnmaskShares(
        b_shares=[pb.SecAggShare(owner=v, share=s) for v, s in ans.b_shares],
        s_shares=[pb.SecAggShare(owner=v, share=s) for v, s in ans.s_shares],
    )
    await r.exchange(r.request(unmask=unmask), Stage.UNMASKING, stage_s, "done")
    return "accepted"
