"""``secure_aggregation: lightsecagg`` over gRPC (in-process server on 127.0.0.1, in-process
asyncio clients): a FedBuff task trained by a group of devices that register keys, exchange
coded mask shares through the server's mailboxes and answer unmasking requests on check-in
matches plain FedBuff on the same updates within the fixed-point bound; bad messages on the
wire get their catalog status and change no state."""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from _service_util import free_port
from asyncfl.core.configload import build_config
from asyncfl.core.update import FloatVector
from asyncfl.secure.crypto import KeyPair
from asyncfl.service.auth import Secret, bearer_metadata
from asyncfl.service.client import ClientOptions, TrainResult, run_clients_async
from asyncfl.service.config import ServiceConfig
from asyncfl.service.errors import REASON_KEY
from asyncfl.service.proto.asyncfl.v1 import service_pb2 as pb
from asyncfl.service.proto.asyncfl.v1 import service_pb2_grpc as pb_grpc
from asyncfl.service.server import start_server
from asyncfl.service.task import initial_params

INPUT, CLASSES = 6, 3
DIM = INPUT * CLASSES + CLASSES
SCALES = (0.05, 0.11, 0.02, 0.08)  # distinct per client: broken weighting would show


def _config(tmp: Path, n: int, k: int, steps: int, port: int = 0) -> ServiceConfig:
    if not (tmp / "secret").exists():
        (tmp / "secret").write_text(secrets.token_hex(32))
    task: dict[str, Any] = {
        "id": "lsa",
        "input_shape": [INPUT],
        "num_classes": CLASSES,
        "model": {"name": "logistic"},
        "algorithm": {"name": "fedbuff", "concurrency": n, "buffer_size": k},
        "server_optimizer": {"name": "sgd", "lr": 1.0},
        "max_server_steps": steps,
        "population": n,
        "secure_aggregation": {"mode": "lightsecagg", "frac_bits": 16, "weight_bits": 12},
        "lightsecagg_answer_timeout_s": 30.0,
    }
    return build_config(
        ServiceConfig,
        {
            "server": {"host": "127.0.0.1", "port": port, "insecure": True},
            "auth": {"secret_file": str(tmp / "secret")},
            "storage": {"dir": str(tmp / "state")},
            "selector": {"retry_after_s": 0.02},
            "tasks": [task],
        },
    )


def _delta(params: FloatVector, client: int) -> FloatVector:
    """Deterministic 'training' that depends on the model, so errors would propagate."""
    s = SCALES[client % len(SCALES)]
    return (s * np.sin(params.astype(np.float64) * (1 + client) + client) + 0.01 * client).astype(
        np.float32
    )


class _Trainer:
    def __init__(self, client: int, seen: dict[tuple[int, int], FloatVector]) -> None:
        self.client, self.seen = client, seen

    def __call__(self, params: FloatVector, version: int, a: pb.Assignment) -> TrainResult:
        d = _delta(params, self.client)
        self.seen[(self.client, version)] = d
        return TrainResult(d, 1 + self.client)


def test_group_trains_like_plain_fedbuff(tmp_path: Path) -> None:
    n, k, steps = 4, 2, 3  # T = 1, U = 2
    cfg = _config(tmp_path, n, k, steps)
    secret = Secret.from_file(tmp_path / "secret")
    seen: dict[tuple[int, int], FloatVector] = {}

    async def run() -> tuple[FloatVector, float]:
        h = await start_server(cfg)
        try:
            clients = [
                (
                    ClientOptions(
                        address=f"127.0.0.1:{h.port}",
                        token=secret.token(str(c)),
                        client_id=c,
                        num_examples=10,
                        backoff_base_s=0.01,
                        seed=c,
                    ),
                    _Trainer(c, seen),
                )
                for c in range(n)
            ]
            reports = await asyncio.wait_for(run_clients_async(clients), 50)
            assert all(r.done for r in reports)
            rt = h.coordinator.tasks["lsa"].runtime
            assert rt.finished and rt.version == steps and rt.lsa is not None
            assert rt.lsa.mailbox_items == 0 and sum(r.accepted for r in reports) >= k * steps
            return rt.params().copy(), rt.lsa.agg.error_bound(k)
        finally:
            await h.stop()

    final, bound = asyncio.run(run())
    with sqlite3.connect(tmp_path / "state" / "ledger.sqlite") as db:
        rows = db.execute(
            "SELECT client_id, base_version, staleness, status, applied_version FROM updates "
            "WHERE task_id = 'lsa' ORDER BY seq"
        ).fetchall()
    applied = [r for r in rows if r[3] == "applied"]
    assert sorted({r[4] for r in applied}) == list(range(1, steps + 1))
    assert all(sum(1 for r in applied if r[4] == v) == k for v in range(1, steps + 1))
    # Independent reference: plain FedBuff (equal weighting, polynomial staleness a = 0.5,
    # SGD lr 1) on exactly the updates the ledger says each step applied.
    p = initial_params(cfg.tasks[0]).astype(np.float64)
    for v in range(1, steps + 1):
        num = np.zeros(DIM)
        for client, base, stale, _, _ in (r for r in applied if r[4] == v):
            num += (1 + stale) ** -0.5 * seen[(client, base)].astype(np.float64)
        p -= num / k
    err = float(np.max(np.abs(final.astype(np.float64) - p)))
    assert err <= steps * bound + 1e-6, (err, bound)
    assert err > 0  # went through F_p, not a plaintext path


def _reason(err: grpc.aio.AioRpcError) -> str:
    return dict(err.trailing_metadata() or ()).get(REASON_KEY, "")


def test_wire_refusals_change_nothing(tmp_path: Path) -> None:
    cfg = _config(tmp_path, n=2, k=2, steps=2)
    secret = Secret.from_file(tmp_path / "secret")

    async def run() -> None:
        h = await start_server(cfg)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{h.port}") as ch:
                stub = pb_grpc.FederatedLearningStub(ch)  # type: ignore[no-untyped-call]

                def md(c: int) -> tuple[tuple[str, str], ...]:
                    return bearer_metadata(secret.token(str(c)))

                async def refused(call: Any, *args: Any, **kw: Any) -> str:
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call(*args, **kw)
                    return _reason(info.value)

                rt = h.coordinator.tasks["lsa"].runtime
                lsa = rt.lsa
                assert lsa is not None
                outsider = await stub.CheckIn(pb.CheckInRequest(num_examples=5), metadata=md(7))
                assert list(outsider.lightsecagg_tasks) == []
                early = await stub.CheckIn(pb.CheckInRequest(num_examples=5), metadata=md(0))
                assert list(early.lightsecagg_tasks) == ["lsa"]
                assert early.WhichOneof("outcome") == "retry_after_s"  # group incomplete
                reg = stub.LightSecAggRegister
                keys = [KeyPair.generate() for _ in range(2)]

                def req(c: int, key: bytes = b"") -> pb.LightSecAggRegisterRequest:
                    return pb.LightSecAggRegisterRequest(
                        task_id="lsa", public_key=key or keys[c].public
                    )

                assert await refused(reg, req(0, b"x" * 31), metadata=md(0)) == "bad_key"
                # Identity is the token's: client 7 cannot register, whatever key it sends.
                assert await refused(reg, req(0), metadata=md(7)) == "not_in_group"
                g0 = await reg(req(0), metadata=md(0))
                assert g0.registered == 1 and not g0.public_keys
                g1 = await reg(req(1), metadata=md(1))
                assert list(g1.public_keys) == [keys[0].public, keys[1].public]
                other = KeyPair.generate().public
                assert await refused(reg, req(0, other), metadata=md(0)) == "key_conflict"

                a = (
                    await stub.CheckIn(pb.CheckInRequest(num_examples=5), metadata=md(0))
                ).assignment
                assert a.task_id == "lsa"
                header = pb.LightSecAggUploadHeader(
                    task_id="lsa",
                    lease_id=a.lease_id,
                    upload_id="u1",
                    base_version=0,
                    num_examples=3,
                    dim=DIM,
                    contribution_seq=0,
                )
                good_share = pb.LightSecAggShare(
                    sender=0, contribution_seq=0, receiver=1, ciphertext=b"c" * lsa.ciphertext_bytes
                )
                data = np.zeros(DIM, "<u4").tobytes()

                async def stream(*parts: pb.LightSecAggUploadChunk) -> Any:
                    for p_ in parts:
                        yield p_

                up = pb.LightSecAggUploadChunk
                cases = {
                    "malformed_message": [up(data=data)],  # no header
                    "protocol": [
                        up(header=header),
                        up(share=pb.LightSecAggShare(receiver=1, ciphertext=b"c")),
                        up(data=data),
                    ],
                }
                for reason, parts in cases.items():
                    got = await refused(stub.LightSecAggUpload, stream(*parts), metadata=md(0))
                    assert got == reason
                after_data = [up(header=header), up(data=data), up(share=good_share)]
                got = await refused(stub.LightSecAggUpload, stream(*after_data), metadata=md(0))
                assert got == "malformed_message"
                self_share = pb.LightSecAggShare(
                    sender=0, receiver=0, ciphertext=b"c" * lsa.ciphertext_bytes
                )
                parts = [up(header=header), up(share=self_share), up(data=data)]
                got = await refused(stub.LightSecAggUpload, stream(*parts), metadata=md(0))
                assert got == "protocol"
                plain = [
                    pb.UploadChunk(
                        header=pb.UploadHeader(
                            task_id="lsa",
                            lease_id=a.lease_id,
                            upload_id="u2",
                            base_version=0,
                            num_examples=3,
                            dim=DIM,
                            dtype=pb.DTYPE_FLOAT32,
                        )
                    ),
                    pb.UploadChunk(data=np.zeros(DIM, "<f4").tobytes()),
                ]
                got = await refused(stub.UploadUpdate, stream(*plain), metadata=md(0))
                assert got == "bad_encoding"
                answer = pb.LightSecAggAnswerRequest(task_id="lsa", buffer_id=3, share=b"")
                assert await refused(stub.LightSecAggAnswer, answer, metadata=md(1)) == (
                    "unknown_buffer"
                )
                poll = pb.LightSecAggPollRequest(task_id="lsa")
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in stub.LightSecAggPoll(poll, metadata=md(7)):
                        pass
                assert _reason(info.value) == "not_in_group"
                items = [i async for i in stub.LightSecAggPoll(poll, metadata=md(1))]
                # No mailbox item, only the watermark (nothing settled: the first boot's ids).
                assert [i.WhichOneof("item") for i in items] == ["settled"]
                # Nothing of any of that reached the aggregator, the ledger or a mailbox.
                assert rt.agg.buffered == 0 and lsa.mailbox_items == 0
                assert h.coordinator.store.counts("lsa") == {}
        finally:
            await h.stop()

    asyncio.run(run())


def test_server_restart_discards_the_unreleased_buffer_and_the_group_goes_on(
    tmp_path: Path,
) -> None:
    """The server stops while a buffer is open (the same client processes keep running and
    reconnect): its rows are discarded, keys and session survive, and the task finishes."""
    n, k, steps = 4, 2, 4
    port = free_port()
    cfg = _config(tmp_path, n, k, steps, port)
    secret = Secret.from_file(tmp_path / "secret")
    seen: dict[tuple[int, int], FloatVector] = {}

    async def run() -> int:
        h = await start_server(cfg)
        clients = [
            (
                ClientOptions(
                    address=f"127.0.0.1:{port}",
                    token=secret.token(str(c)),
                    client_id=c,
                    num_examples=10,
                    backoff_base_s=0.01,
                    backoff_cap_s=0.2,
                    seed=c,
                ),
                _Trainer(c, seen),
            )
            for c in range(n)
        ]
        running = asyncio.ensure_future(run_clients_async(clients))
        try:
            rt = h.coordinator.tasks["lsa"].runtime
            for _ in range(4000):  # stop right after a step, with rows in the next buffer
                if rt.version >= 1 and rt.agg.buffered >= 1:
                    break
                await asyncio.sleep(0.005)
            assert rt.version < steps and rt.agg.buffered >= 1 and rt.lsa is not None
            session, boot, stopped_at = rt.lsa.session_id, rt.lsa.boot, rt.version
        finally:
            await h.stop(0)  # in-flight calls are cut: the clients see the server vanish
        with sqlite3.connect(tmp_path / "state" / "ledger.sqlite") as db:
            (unreleased,) = db.execute(
                "SELECT COUNT(*) FROM updates WHERE status = 'buffered'"
            ).fetchone()
        assert unreleased >= 1
        h = await start_server(cfg)
        try:
            rt = h.coordinator.tasks["lsa"].runtime
            assert rt.lsa is not None and rt.lsa.complete  # no device registers again
            assert rt.lsa.session_id == session and rt.lsa.boot == boot + 1
            assert rt.discarded_total == unreleased  # discarded at recovery, not replayed
            reports = await asyncio.wait_for(running, 50)
            assert all(r.done for r in reports) and rt.finished and rt.version == steps
            # A device that checked in after the restart (it trained on a model newer than
            # the stop's) polled the new boot, whose settle watermark is above every old
            # buffer id: it holds no share of the discarded boot's contributions (no request
            # ever came for them). -1: its own share of an upload answered "duplicate" whose
            # buffer the next poll would have bounded (the task ended first).
            first_id = (boot + 1) << 32
            polled = [r for r in reports if any(u.base_version > stopped_at for u in r.uploads)]
            assert polled, "no device came back after the restart"
            for r in polled:
                assert all(b >= first_id or b == -1 for b in r.lightsecagg_held), (
                    r.client_id,
                    r.lightsecagg_held,
                )
            return rt.discarded_total
        finally:
            await h.stop()

    discarded = asyncio.run(run())
    with sqlite3.connect(tmp_path / "state" / "ledger.sqlite") as db:
        rows = db.execute(
            "SELECT status, applied_version FROM updates WHERE task_id = 'lsa' ORDER BY seq"
        ).fetchall()
    applied = [v for s, v in rows if s == "applied"]
    assert sorted(applied) == [v for v in range(1, steps + 1) for _ in range(k)]
    assert discarded >= 1 and sum(s == "discarded" for s, _ in rows) == discarded
    assert all(s != "buffered" for s, _ in rows)
