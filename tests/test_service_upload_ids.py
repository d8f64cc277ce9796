"""Upload ids across client restarts (in-process server on 127.0.0.1).

Regression: the client drew its upload ids from its seeded jitter stream, so a client process
restarted with the same seed and id repeated them; the server answered its NEW updates
"duplicate" (the client counted them as accepted, nothing was applied) and each such refusal
kept its lease's slot until the lease expired, so with every slot held the task stalled.
This made tests/test_service_dp.py's restart test time out under load."""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from asyncfl.core.configload import build_config
from asyncfl.service.auth import Secret, bearer_metadata
from asyncfl.service.client import ClientOptions, TrainResult, run_client_async
from asyncfl.service.config import ServiceConfig
from asyncfl.service.proto.asyncfl.v1 import service_pb2 as pb
from asyncfl.service.proto.asyncfl.v1 import service_pb2_grpc as pb_grpc
from asyncfl.service.server import start_server


def _config(tmp: Path, concurrency: int) -> ServiceConfig:
    (tmp / "secret").write_text(secrets.token_hex(32))
    return build_config(
        ServiceConfig,
        {
            "server": {"host": "127.0.0.1", "port": 0, "insecure": True},
            "auth": {"secret_file": str(tmp / "secret")},
            "storage": {"dir": str(tmp / "state")},
            "selector": {"retry_after_s": 0.02},
            "tasks": [
                {
                    "id": "t",
                    "input_shape": [4],
                    "num_classes": 2,
                    "model": {"name": "logistic"},
                    "algorithm": {"name": "fedbuff", "concurrency": concurrency, "buffer_size": 5},
                    "max_server_steps": 10,
                }
            ],
        },
    )


def _train(params: Any, version: int, a: pb.Assignment) -> TrainResult:
    return TrainResult(np.full(a.model_dim, 0.01, np.float32), 3)


def test_a_restarted_client_never_repeats_an_upload_id(tmp_path: Path) -> None:
    cfg = _config(tmp_path, concurrency=2)
    secret = Secret.from_file(tmp_path / "secret")

    async def run() -> list[str]:
        h = await start_server(cfg)
        try:
            outcomes = []
            for _ in range(2):  # the same device (seed 0, id 7) run twice, as two processes
                opts = ClientOptions(
                    address=f"127.0.0.1:{h.port}",
                    token=secret.token("7"),
                    client_id=7,
                    num_examples=3,
                    max_updates=1,
                    backoff_base_s=0.01,
                )
                rep = await asyncio.wait_for(run_client_async(opts, _train), 30)
                outcomes += [u.outcome for u in rep.uploads]
            return outcomes
        finally:
            await h.stop()

    assert asyncio.run(run()) == ["accepted", "accepted"]
    with sqlite3.connect(tmp_path / "state" / "ledger.sqlite") as db:
        ids = db.execute("SELECT upload_id FROM updates").fetchall()
    assert len(ids) == len(set(ids)) == 2


def test_a_duplicate_upload_frees_its_lease_slot(tmp_path: Path) -> None:
    """Concurrency 1: an upload id that was already committed, sent again under a fresh lease,
    is answered ALREADY_EXISTS and that lease's slot is free for the next check-in at once."""
    cfg = _config(tmp_path, concurrency=1)
    secret = Secret.from_file(tmp_path / "secret")
    md = bearer_metadata(secret.token("3"))
    # Another device probes the slot: client 3 checking in again would end its own lease.
    other = bearer_metadata(secret.token("4"))

    async def upload(stub: Any, a: pb.Assignment, upload_id: str) -> None:
        header = pb.UploadHeader(
            task_id="t",
            lease_id=a.lease_id,
            upload_id=upload_id,
            base_version=a.model_version,
            num_examples=2,
            dim=a.model_dim,
            dtype=pb.DTYPE_FLOAT32,
        )
        data = np.full(a.model_dim, 0.01, "<f4").tobytes()

        async def chunks() -> Any:
            yield pb.UploadChunk(header=header)
            yield pb.UploadChunk(data=data)

        await stub.UploadUpdate(chunks(), metadata=md, timeout=10)

    async def run() -> None:
        h = await start_server(cfg)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{h.port}") as ch:
                stub = pb_grpc.FederatedLearningStub(ch)  # type: ignore[no-untyped-call]
                req = pb.CheckInRequest(num_examples=2, task_id="t")
                first = await stub.CheckIn(req, metadata=md, timeout=10)
                await upload(stub, first.assignment, "u1")
                second = await stub.CheckIn(req, metadata=md, timeout=10)
                assert second.WhichOneof("outcome") == "assignment"
                full = await stub.CheckIn(req, metadata=other, timeout=10)
                assert full.WhichOneof("outcome") == "retry_after_s"  # the one slot is taken
                try:
                    await upload(stub, second.assignment, "u1")
                    raise AssertionError("a repeated upload id was accepted")
                except grpc.aio.AioRpcError as err:
                    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
                third = await stub.CheckIn(req, metadata=other, timeout=10)
                assert third.WhichOneof("outcome") == "assignment"
        finally:
            await h.stop()

    asyncio.run(run())
