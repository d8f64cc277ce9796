"""LightSecAgg on the wire: proto <-> protocol messages and the server's four handlers.

``LightSecAggRegister`` (unary) registers the caller's key; ``LightSecAggPoll`` (server
streaming) acknowledges and returns the caller's mailbox; ``LightSecAggAnswer`` (unary) takes
an aggregated share; ``LightSecAggUpload`` (client streaming) takes one contribution: header,
the ``N - 1`` encrypted shares, then the masked vector in chunks. The caller is always the
client id of the verified bearer token, never a request field.

Sizes are checked before anything is buffered: the header (lease, dim = the model's) before
any share or data, each share's ciphertext length and receiver as it arrives, at most
``N - 1`` shares and exactly ``4 dim`` data bytes, so one upload allocates at most its
contribution's size. Every refusal is a :class:`~asyncfl.service.errors.ServiceError` from
the catalog and changes no state (the aggregator's checks are in ``lightsecagg_task.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np

from asyncfl.secure.lightsecagg import P
from asyncfl.service.coordinator import Coordinator, UploadHeaderInfo
from asyncfl.service.errors import ServiceError
from asyncfl.service.lightsecagg_task import GroupInfo, LightSecAggTask, LightSecAggUpload
from asyncfl.service.proto.asyncfl.v1 import service_pb2 as pb

__all__ = [
    "group_to_pb",
    "handle_answer",
    "handle_poll",
    "handle_register",
    "handle_upload",
    "member_tasks",
]

_MESSAGE_SLACK = 1024
"""Bytes of a message besides its share (ids, tags): a share must fit the message limit."""


def member_tasks(coord: Coordinator, client_id: int) -> list[str]:
    """Unfinished lightsecagg tasks served here whose group ``client_id`` belongs to."""
    return [
        t.cfg.id
        for t in coord.tasks.values()
        if t.runtime.lsa is not None
        and not t.runtime.finished
        and t.runtime.lsa.is_member(client_id)
    ]


def _lsa(coord: Coordinator, task_id: str) -> LightSecAggTask:
    rt = coord.task(task_id).runtime
    if rt.lsa is None:
        raise ServiceError("bad_encoding", f"task {task_id!r} is not a lightsecagg task")
    return rt.lsa


def group_to_pb(info: GroupInfo) -> pb.LightSecAggGroup:
    prm = info.params
    return pb.LightSecAggGroup(
        num_users=prm.num_users,
        privacy_threshold=prm.privacy_threshold,
        target_survivors=prm.target_survivors,
        dim=prm.dim,
        min_contributions=prm.min_contributions,
        session_id=info.session_id,
        clip=info.clip,
        frac_bits=info.frac_bits,
        weight_bits=info.weight_bits,
        registered=info.registered,
        public_keys=list(info.directory or ()),
    )


async def handle_register(
    coord: Coordinator, client_id: int, req: pb.LightSecAggRegisterRequest
) -> pb.LightSecAggGroup:
    t = coord.task(req.task_id)
    # A share travels in one gRPC message each way: refuse to build a group that could not
    # carry them (no key is stored, so the operator can fix the limit and restart).
    share_bytes = _lsa(coord, req.task_id).ciphertext_bytes
    if share_bytes + _MESSAGE_SLACK > coord.cfg.server.max_message_bytes:
        raise ServiceError(
            "message_too_large",
            f"a share of task {req.task_id} does not fit one message; raise "
            "server.max_message_bytes or lower dim / (U - T)",
        )
    async with t.lock:
        if t.closed:
            raise ServiceError("task_moved", req.task_id)
        lsa = _lsa(coord, req.task_id)  # under the lock: a recovery may have replaced it
        # The key store's fsync runs in a worker thread; the event loop keeps serving.
        info = await asyncio.to_thread(lsa.register, client_id, bytes(req.public_key))
    return group_to_pb(info)


async def handle_poll(
    coord: Coordinator, client_id: int, req: pb.LightSecAggPollRequest
) -> list[pb.LightSecAggMailboxItem]:
    task = _lsa(coord, req.task_id)
    items = task.poll(client_id, req.after_seq)
    out = []
    for it in items:
        if it.share is not None:
            s = it.share
            msg = pb.LightSecAggShare(
                sender=s.contribution.user,
                contribution_seq=s.contribution.seq,
                receiver=s.receiver,
                ciphertext=s.ciphertext,
                buffer_id=it.buffer_id,
            )
            out.append(pb.LightSecAggMailboxItem(seq=it.seq, share=msg))
        elif it.request is not None:
            r = it.request
            out.append(
                pb.LightSecAggMailboxItem(
                    seq=it.seq,
                    request=pb.LightSecAggRequest(
                        buffer_id=r.buffer_id,
                        senders=[c.user for c in r.contributions],
                        seqs=[c.seq for c in r.contributions],
                        weights=list(r.weights),
                    ),
                )
            )
    settled = pb.LightSecAggSettled(below=task.settled_below, open=task.server.open_buffer_id)
    out.append(pb.LightSecAggMailboxItem(seq=0, settled=settled))
    return out


async def handle_answer(
    coord: Coordinator, client_id: int, req: pb.LightSecAggAnswerRequest
) -> pb.LightSecAggAnswerResponse:
    t = coord.task(req.task_id)
    _lsa(coord, req.task_id)
    async with t.lock:
        if t.closed:
            raise ServiceError("task_moved", req.task_id)
        lsa = _lsa(coord, req.task_id)  # under the lock: a recovery may have replaced it
        lsa.on_answer(client_id, req.buffer_id, bytes(req.share))
        now = coord._clock()
        if lsa.due(now):  # the U-th answer of the oldest buffer: unmask and step now
            await asyncio.to_thread(t.runtime.settle_lightsecagg, now)
    return pb.LightSecAggAnswerResponse()


async def handle_upload(
    coord: Coordinator,
    client_id: int,
    first: pb.LightSecAggUploadChunk | None,
    rest: AsyncIterator[pb.LightSecAggUploadChunk],
) -> pb.UploadResponse:
    """Receive one contribution and submit it (group commit: answered once its row is in
    the ledger)."""
    if not isinstance(first, pb.LightSecAggUploadChunk) or first.WhichOneof("part") != "header":
        raise ServiceError("malformed_message", "the first chunk must be the header")
    h = first.header
    header = UploadHeaderInfo(
        task_id=h.task_id,
        lease_id=h.lease_id,
        upload_id=h.upload_id,
        base_version=h.base_version,
        num_examples=h.num_examples,
        dim=h.dim,
        float32=False,
        lightsecagg=True,
    )
    try:
        t, _ = coord.check_upload(client_id, header)
        lsa = t.runtime.lsa
        assert lsa is not None  # check_upload refuses LightSecAgg uploads to other tasks
        n = lsa.params.num_users
        shares: dict[int, bytes] = {}
        # The header is checked: dim equals the model's, so this allocation is bounded.
        buf = bytearray(4 * header.dim)
        filled = 0
        async for chunk in rest:
            part = (
                chunk.WhichOneof("part") if isinstance(chunk, pb.LightSecAggUploadChunk) else None
            )
            if part == "share":
                s = chunk.share
                if filled:
                    raise ServiceError("malformed_message", "a share after the data")
                if not 0 <= s.receiver < n or s.receiver == client_id or s.receiver in shares:
                    raise ServiceError("protocol", f"share for receiver {s.receiver}")
                if (
                    len(s.ciphertext) != lsa.ciphertext_bytes
                    or s.sender != client_id
                    or s.contribution_seq != h.contribution_seq
                ):
                    raise ServiceError("protocol", "share of the wrong size or contribution")
                shares[s.receiver] = bytes(s.ciphertext)
            elif part == "data":
                data = chunk.data
                if filled + len(data) > len(buf):
                    raise ServiceError("message_too_large", f"> {len(buf)} bytes")
                buf[filled : filled + len(data)] = data
                filled += len(data)
            else:
                raise ServiceError("malformed_message", "a second header")
        if filled != len(buf):
            raise ServiceError("malformed_message", f"{filled} of {len(buf)} bytes")
        masked = np.frombuffer(buf, dtype="<u4").astype(np.uint64)
        if masked.size and int(masked.max()) >= P:
            raise ServiceError("protocol", "masked vector has elements >= p")
        up = LightSecAggUpload(h.contribution_seq, tuple(sorted(shares.items())), masked)
    except ServiceError as err:
        if err.reason in ("malformed_message", "message_too_large", "protocol"):
            coord.release(header.task_id, header.lease_id)
        raise
    empty = np.zeros(0, np.float32)
    res = await coord.submit(client_id, header, empty, lightsecagg=up)
    return pb.UploadResponse(
        model_version=res.version,
        staleness=res.staleness,
        weight=res.weight,
        stepped=res.stepped,
        lightsecagg_buffer_id=res.lightsecagg_buffer_id,
    )
