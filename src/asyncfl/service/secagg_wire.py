"""The SecAgg rounds on the wire: proto <-> protocol messages, and the two server handlers.

``SecAgg`` (unary) carries a join, AdvertiseKeys, ShareKeys, an UnmaskResponse, or a poll;
``SecAggMaskedInput`` (client streaming) the masked ring vector, header first, so a
model-sized input streams in chunks and its size is checked before any data is received.
The sender of every message is the client id of the verified bearer token, never a field
of the request: a client cannot speak for another, and a server message is only ever
returned to its recipient.

Conversions check sizes before anything reaches the round (keys, share and ciphertext
lengths, list lengths bounded by the round's participants); the protocol machine checks
the rest. Every refusal is a :class:`~asyncfl.service.errors.ServiceError` from the catalog.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import numpy as np

from asyncfl.secure import crypto, shamir
from asyncfl.secure.secagg import Stage
from asyncfl.secure.secagg.messages import (
    AdvertiseKeys,
    ClientMessage,
    EncryptedShare,
    KeyBroadcast,
    MaskedInput,
    PublicKeys,
    ShareBroadcast,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from asyncfl.service.errors import ServiceError
from asyncfl.service.proto.asyncfl.v1 import service_pb2 as pb
from asyncfl.service.secagg_round import Reply, RoundDone, RoundInfo, SecAggParams

if TYPE_CHECKING:
    from asyncfl.service.coordinator import Coordinator
    from asyncfl.service.secagg_task import SecAggTask

__all__ = [
    "STAGE_FROM_PB",
    "STAGE_TO_PB",
    "digest",
    "handle_masked_input",
    "handle_step",
    "params_from_pb",
    "params_to_pb",
    "reply_to_pb",
]

SHARE_BYTES = shamir.ELEMENT_BYTES * math.ceil(crypto.KEY_BYTES / shamir.CHUNK_BYTES)
"""Bytes of one Shamir share of a 32-byte secret (a self-mask seed or a mask key)."""
MAX_CIPHERTEXT_BYTES = 256
"""An encrypted share pair is 140 bytes (nonce, two ids, two shares, tag); anything far
larger is not one."""

STAGE_TO_PB: dict[Stage | None, int] = {
    None: pb.SECAGG_STAGE_JOIN,
    Stage.ADVERTISE_KEYS: pb.SECAGG_STAGE_ADVERTISE_KEYS,
    Stage.SHARE_KEYS: pb.SECAGG_STAGE_SHARE_KEYS,
    Stage.MASKED_INPUT: pb.SECAGG_STAGE_MASKED_INPUT,
    Stage.UNMASKING: pb.SECAGG_STAGE_UNMASKING,
}
STAGE_FROM_PB: dict[int, Stage | None] = {v: k for k, v in STAGE_TO_PB.items()}


# -- parameters -------------------------------------------------------------------------------
def params_to_pb(p: SecAggParams) -> pb.SecAggParams:
    return pb.SecAggParams(
        mode=p.mode,
        clip=p.clip,
        frac_bits=p.frac_bits,
        ring_bits=p.ring_bits,
        threshold_fraction=p.threshold_fraction,
        corrupt_fraction=p.corrupt_fraction,
        dropout_fraction=p.dropout_fraction,
        stage_timeout_s=p.stage_timeout_s,
        min_inputs=p.min_inputs,
        noise_std=p.noise_std,
        max_weight=p.max_weight,
    )


def params_from_pb(m: pb.SecAggParams) -> SecAggParams:
    """The device side; raises ValueError on parameters no task config could produce."""
    if m.mode not in ("secagg", "secagg+"):
        raise ValueError(f"secagg mode {m.mode!r}")
    ok = (
        math.isfinite(m.clip)
        and m.clip > 0
        and 1 <= m.frac_bits < m.ring_bits <= 64
        and 0 < m.threshold_fraction < 1
        and 0 <= m.corrupt_fraction + m.dropout_fraction < 0.5
        and min(m.corrupt_fraction, m.dropout_fraction) >= 0
        and m.stage_timeout_s > 0
        and m.min_inputs >= 2
        and math.isfinite(m.noise_std)
        and m.noise_std >= 0
        and m.max_weight >= 1
    )
    if not ok:
        raise ValueError(f"secagg parameters out of range: {m}")
    return SecAggParams(
        mode="secagg" if m.mode == "secagg" else "secagg+",
        clip=m.clip,
        frac_bits=m.frac_bits,
        ring_bits=m.ring_bits,
        threshold_fraction=m.threshold_fraction,
        corrupt_fraction=m.corrupt_fraction,
        dropout_fraction=m.dropout_fraction,
        stage_timeout_s=m.stage_timeout_s,
        min_inputs=m.min_inputs,
        noise_std=m.noise_std,
        max_weight=m.max_weight,
    )


# -- server -> client -------------------------------------------------------------------------
def reply_to_pb(r: Reply | None) -> pb.SecAggResponse:
    match r:
        case None:
            return pb.SecAggResponse(retry_after_s=0.0)
        case RoundInfo():
            return pb.SecAggResponse(
                round=pb.SecAggRound(
                    session_id=r.session_id,
                    model_version=r.version,
                    participants=list(r.participants),
                    graph_seed=r.graph_seed,
                    weight=r.weight,
                )
            )
        case KeyBroadcast():
            keys = [pb.SecAggPeerKeys(client_id=v, c_pk=k.c_pk, s_pk=k.s_pk) for v, k in r.keys]
            return pb.SecAggResponse(key_broadcast=pb.SecAggKeyBroadcast(keys=keys))
        case ShareBroadcast():
            cts = [pb.SecAggCiphertext(peer=e.sender, ciphertext=e.ciphertext) for e in r.shares]
            return pb.SecAggResponse(share_broadcast=pb.SecAggShares(shares=cts))
        case UnmaskRequest():
            return pb.SecAggResponse(
                unmask_request=pb.SecAggUnmaskRequest(
                    survivors=sorted(r.survivors), dropped=sorted(r.dropped)
                )
            )
        case RoundDone():
            return pb.SecAggResponse(
                done=pb.SecAggDone(model_version=r.version, survivors=r.survivors)
            )
    raise TypeError(f"not a SecAgg reply: {type(r).__name__}")  # pragma: no cover


# -- client -> server -------------------------------------------------------------------------
def digest(data: bytes) -> bytes:
    """Identifies a message so an identical retry is recognised (not a second message)."""
    return hashlib.sha256(data).digest()


def _malformed(detail: str) -> ServiceError:
    return ServiceError("malformed_message", detail)


def message_from_pb(
    req: pb.SecAggRequest, client: int, max_peers: int
) -> tuple[ClientMessage, bytes]:
    """The protocol message of a request (``client`` from the token) and its digest."""
    sid = bytes(req.session_id)
    body = req.WhichOneof("body")
    msg: ClientMessage
    if body == "advertise_keys":
        k = req.advertise_keys
        if len(k.c_pk) != crypto.KEY_BYTES or len(k.s_pk) != crypto.KEY_BYTES:
            raise _malformed("public keys must be 32 bytes")
        msg = AdvertiseKeys(sid, client, PublicKeys(bytes(k.c_pk), bytes(k.s_pk)))
        data = req.advertise_keys.SerializeToString(deterministic=True)
    elif body == "share_keys":
        shares = req.share_keys.shares
        if len(shares) > max_peers:
            raise _malformed(f"{len(shares)} ciphertexts for {max_peers} peers")
        if any(len(e.ciphertext) > MAX_CIPHERTEXT_BYTES for e in shares):
            raise _malformed("ciphertext too long")
        msg = ShareKeys(
            sid,
            client,
            tuple(EncryptedShare(client, int(e.peer), bytes(e.ciphertext)) for e in shares),
        )
        data = req.share_keys.SerializeToString(deterministic=True)
    elif body == "unmask":
        u = req.unmask
        if len(u.b_shares) + len(u.s_shares) > max_peers:
            raise _malformed("more shares than peers")
        if any(len(s.share) != SHARE_BYTES for s in (*u.b_shares, *u.s_shares)):
            raise _malformed(f"a share must be {SHARE_BYTES} bytes")
        msg = UnmaskResponse(
            sid,
            client,
            tuple((int(s.owner), bytes(s.share)) for s in u.b_shares),
            tuple((int(s.owner), bytes(s.share)) for s in u.s_shares),
        )
        data = u.SerializeToString(deterministic=True)
    else:
        raise _malformed(f"no protocol message in a {body!r} request")
    return msg, digest(data)


# -- server handlers --------------------------------------------------------------------------
def _secagg_of(coord: Coordinator, task_id: str) -> tuple[SecAggTask, dict[str, int]]:
    t = coord.task(task_id)
    if t.secagg is None:
        raise ServiceError("bad_encoding", f"task {task_id!r} does not run SecAgg rounds")
    return t.secagg, t.refused


def _count(refused: dict[str, int], err: ServiceError) -> ServiceError:
    refused[err.reason] = refused.get(err.reason, 0) + 1
    return err


async def handle_step(coord: Coordinator, client: int, req: object) -> pb.SecAggResponse:
    """``SecAgg``: a join, a stage message or a poll; answers the client's next message."""
    if not isinstance(req, pb.SecAggRequest):
        raise _malformed("not a SecAggRequest")
    sa, refused = _secagg_of(coord, req.task_id)
    try:
        body = req.WhichOneof("body")
        if body == "join":
            reply = await sa.join(client, req.lease_id, req.join.num_examples)
        elif body == "poll":
            if req.poll not in STAGE_FROM_PB:
                raise _malformed(f"poll for stage {req.poll}")
            sent = STAGE_FROM_PB[req.poll]
            reply = await sa.poll(client, req.lease_id, bytes(req.session_id), sent)
        elif body is None:
            raise _malformed("empty SecAggRequest")
        else:
            msg, dig = message_from_pb(req, client, sa.alg.cohort_size)
            reply = await sa.receive(client, req.lease_id, msg, dig)
    except ServiceError as err:
        raise _count(refused, err) from None
    return reply_to_pb(reply)


async def handle_masked_input(
    coord: Coordinator, client: int, chunks: AsyncIterator[object]
) -> pb.SecAggResponse:
    """``SecAggMaskedInput``: header (checked first), then the ring elements."""
    first = await anext(aiter(chunks), None)
    if not isinstance(first, pb.SecAggInputChunk) or first.WhichOneof("part") != "header":
        raise _malformed("the first chunk must be the header")
    h = first.header
    sa, refused = _secagg_of(coord, h.task_id)
    try:
        dim, ring = sa.masked_input_shape(client, h.lease_id, bytes(h.session_id))
        width = ring.itemsize
        if h.dtype != (pb.DTYPE_RING_U32 if width == 4 else pb.DTYPE_RING_U64):
            raise ServiceError("bad_dtype", f"ring of {width} bytes expected")
        if h.dim != dim:
            raise ServiceError("bad_shape", f"dim {h.dim} != model {dim}")
        # The header is checked: this allocation is one model's worth of ring elements.
        buf = bytearray(width * dim)
        filled = 0
        async for chunk in chunks:
            if not isinstance(chunk, pb.SecAggInputChunk) or chunk.WhichOneof("part") != "data":
                raise _malformed("a second header")
            data = chunk.data
            if filled + len(data) > len(buf):
                raise ServiceError("message_too_large", f"> {len(buf)} bytes")
            buf[filled : filled + len(data)] = data
            filled += len(data)
        if filled != len(buf):
            raise _malformed(f"{filled} of {len(buf)} bytes")
        masked = np.frombuffer(buf, dtype=ring.newbyteorder("<")).astype(ring)
        msg = MaskedInput(bytes(h.session_id), client, masked)
        reply = await sa.receive(client, h.lease_id, msg, digest(bytes(buf)))
    except ServiceError as err:
        raise _count(refused, err) from None
    return reply_to_pb(reply)
