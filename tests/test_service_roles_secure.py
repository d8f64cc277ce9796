"""Secure modes with the roles split (coordinator, aggregator and selector as separate gRPC
servers in one event loop on 127.0.0.1), and no wasted training in the TEE / LightSecAgg
buffers: a device whose update waits in the buffer that is filling gets no lease until it is
released, so none of its uploads is refused ``duplicate_client``.

(The same with OS processes for tee + DP and SecAgg tasks: tests/test_service_roles_procs.py.)
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from _service_util import free_port
from asyncfl.core.configload import build_config
from asyncfl.core.update import FloatVector
from asyncfl.privacy import PrivacyAccountant, PrivacyConfig
from asyncfl.secure.crypto import KeyPair
from asyncfl.secure.fixedpoint import FixedPointCodec
from asyncfl.secure.tee import TeeClient
from asyncfl.service.auth import Secret, bearer_metadata
from asyncfl.service.client import (
    ClientOptions,
    ClientReport,
    TeeTrust,
    TrainResult,
    run_clients_async,
)
from asyncfl.service.config import ServiceConfig
from asyncfl.service.coordinator import Coordinator
from asyncfl.service.errors import REASON_KEY
from asyncfl.service.proto.asyncfl.v1 import service_pb2 as pb
from asyncfl.service.proto.asyncfl.v1 import service_pb2_grpc as pb_grpc
from asyncfl.service.roles import RoleHandle, start_aggregator, start_coordinator, start_selector
from asyncfl.service.server import start_server
from asyncfl.service.task import Accepted, Submission, initial_params
from asyncfl.service.tee import expected_measurement_for, load_vendor, vendor_key_path

INPUT, CLASSES = 6, 3
DIM = INPUT * CLASSES + CLASSES


def _task(task_id: str, **kw: Any) -> dict[str, Any]:
    return {
        "id": task_id,
        "input_shape": [INPUT],
        "num_classes": CLASSES,
        "model": {"name": "logistic"},
        "server_optimizer": {"name": "sgd", "lr": 1.0},
        **kw,
    }


def _tee_task(k: int, concurrency: int, steps: int) -> dict[str, Any]:
    return _task(
        "tee",
        algorithm={"name": "fedbuff", "concurrency": concurrency, "buffer_size": k},
        max_server_steps=steps,
        secure_aggregation={"mode": "tee", "tee_backend": "inprocess", "clip": 1.0},
    )


def _lsa_task(n: int, k: int, steps: int) -> dict[str, Any]:
    return _task(
        "lsa",
        algorithm={"name": "fedbuff", "concurrency": n, "buffer_size": k},
        max_server_steps=steps,
        population=n,
        secure_aggregation={"mode": "lightsecagg", "frac_bits": 16, "weight_bits": 12},
        lightsecagg_answer_timeout_s=30.0,
    )


def _config(tmp: Path, tasks: list[dict[str, Any]]) -> ServiceConfig:
    if not (tmp / "secret").exists():
        (tmp / "secret").write_text(secrets.token_hex(32))
    return build_config(
        ServiceConfig,
        {
            "server": {"host": "127.0.0.1", "port": free_port(), "insecure": True},
            "auth": {"secret_file": str(tmp / "secret")},
            "storage": {"dir": str(tmp / "state"), "keep_applied_deltas": True},
            "selector": {"retry_after_s": 0.02},
            "roles": {
                "coordinator": f"127.0.0.1:{free_port()}",
                "heartbeat_s": 0.1,
                "owner_ttl_s": 1.0,
                "aggregators": [{"id": "a", "listen": "127.0.0.1:0"}],
            },
            "tasks": tasks,
        },
    )


class _Trainer:
    """Asymmetric, model-dependent deltas; client 0 trains in no time and the others take
    ``slow_s``, so client 0 is back while its update still waits for theirs (the case in
    which it used to be leased again, train, and be refused ``duplicate_client``)."""

    def __init__(self, client: int, slow_s: float) -> None:
        self.client = client
        self.delay_s = 0.0 if client == 0 else slow_s

    def __call__(self, params: FloatVector, version: int, a: pb.Assignment) -> TrainResult:
        time.sleep(self.delay_s)  # runs in the client's worker thread, as training does
        rng = np.random.default_rng(version * 1000 + self.client)
        d = 0.05 * np.sin(params.astype(np.float64) + rng.normal(size=params.shape))
        return TrainResult(d.astype(np.float32), 3 + version % 4)


def _clients(
    cfg: ServiceConfig, port: int, ids: range, tee: TeeTrust | None = None, slow_s: float = 0.0
) -> list[tuple[ClientOptions, Any]]:
    secret = Secret.from_file(Path(cfg.auth.secret_file or ""))
    return [
        (
            ClientOptions(
                address=f"127.0.0.1:{port}",
                token=secret.token(str(c)),
                client_id=c,
                num_examples=10,
                backoff_base_s=0.01,
                backoff_cap_s=0.3,
                seed=c,
                tee=tee,
            ),
            _Trainer(c, slow_s),
        )
        for c in ids
    ]


async def _split(cfg: ServiceConfig) -> list[RoleHandle]:
    """Coordinator, aggregator and selector (last), with the task assigned."""
    handles = [await start_coordinator(cfg), await start_aggregator(cfg, "a")]
    handles.append(await start_selector(cfg))
    agg = handles[1]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    try:
        while agg.core is None or len(agg.core.tasks) < len(cfg.tasks):
            assert loop.time() < deadline, "tasks never assigned"
            await asyncio.sleep(0.02)
    except BaseException:
        for h in reversed(handles):
            await h.stop(0)
        raise
    return handles


def _ledger(tmp: Path, task: str) -> list[tuple[int, str, int | None]]:
    with sqlite3.connect(tmp / "state" / "ledger.sqlite") as db:
        return db.execute(
            "SELECT client_id, status, applied_version FROM updates WHERE task_id = ? ORDER BY seq",
            (task,),
        ).fetchall()


def _outcomes(reports: list[ClientReport]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in reports:
        for u in r.uploads:
            out[u.outcome] = out.get(u.outcome, 0) + 1
    return out


# -- the lease rule as a state machine (no network) -------------------------------------------
def test_tee_buffer_member_gets_no_lease_until_the_release(tmp_path: Path) -> None:
    k = 3
    plain = _task(
        "plain",
        algorithm={"name": "fedbuff", "concurrency": 5, "buffer_size": k},
        max_server_steps=5,
    )
    cfg = _config(tmp_path, [_tee_task(k, concurrency=5, steps=5), plain])
    coord = Coordinator(cfg, Secret.from_file(tmp_path / "secret"))
    try:
        rt = coord.tasks["tee"].runtime
        assert rt.tee is not None and rt.vendor is not None
        ec = rt.tee.enclave
        device = TeeClient(
            vendor_public=rt.vendor.public,
            expected=expected_measurement_for(cfg.tasks[0], rt.dim),
            codec=FixedPointCodec(clip=ec.clip, frac_bits=ec.frac_bits, ring_bits=ec.ring_bits),
            task="tee",
            dim=rt.dim,
        )
        rng = np.random.default_rng(3)

        def train_and_upload(c: int) -> Accepted:
            a = coord.check_in(c, 10, "tee")
            assert a is not None, f"client {c} got no lease"
            assert rt.tee is not None
            up = device.upload(
                rt.tee.agg.report,
                client_id=c,
                base_version=a.version,
                num_examples=3,
                delta=rng.normal(0, 0.1, rt.dim).astype(np.float32),
                rng=rng,
            )
            sub = Submission(c, f"u{c}-{a.version}", a.version, 3, np.zeros(0, np.float32), up)
            res = rt.submit_many([sub])[0]
            coord.release("tee", a.lease_id)
            assert isinstance(res, Accepted), res
            return res

        train_and_upload(1)
        slots = coord.tasks["tee"].slots
        assert len(slots.active) == 0 < slots.capacity  # a slot is free, yet:
        assert coord.check_in(1, 10, "tee") is None  # its update waits in the buffer
        assert rt.buffer_holds(1) and not rt.buffer_holds(2)
        # Another client is not held back, nor is client 1 in a task without the rule.
        train_and_upload(2)
        assert coord.check_in(1, 10, "plain") is not None
        assert coord.check_in(2, 10, "tee") is None
        assert train_and_upload(3).stepped  # K distinct contributions: released
        assert rt.version == 1 and not rt.buffer_holds(1)
        assert coord.check_in(1, 10, "tee") is not None  # free again
    finally:
        coord.close()


# -- over gRPC --------------------------------------------------------------------------------
@pytest.mark.parametrize("split", [False, True], ids=["one-process", "split-roles"])
def test_tee_devices_never_train_for_a_buffer_that_has_their_update(
    tmp_path: Path, split: bool
) -> None:
    """Four devices, K = 3, slots for all of them; device 0 trains in no time and is back
    while its update is buffered. Before the rule it was leased, trained and refused
    duplicate_client over and over; now it waits, and every upload is accepted."""
    k, steps = 3, 5
    cfg = _config(tmp_path, [_tee_task(k, concurrency=4, steps=steps)])
    t = cfg.tasks[0]
    # The devices' trust anchor, set up out of band (what `asyncfl tee-trust` prints).
    vendor = load_vendor(vendor_key_path(t, Path(cfg.storage.dir)))
    trust = TeeTrust(vendor.public, expected_measurement_for(t, int(initial_params(t).shape[0])))

    async def run() -> tuple[list[ClientReport], pb.TaskStatus]:
        if split:
            handles = await _split(cfg)
            port = handles[-1].port
        else:
            h = await start_server(cfg)
            port = h.port
        try:
            reports = await asyncio.wait_for(
                run_clients_async(_clients(cfg, port, range(4), trust, slow_s=0.15)), 40
            )
            secret = Secret.from_file(tmp_path / "secret")
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                status = await pb_grpc.FederatedLearningStub(ch).Status(
                    pb.StatusRequest(), metadata=bearer_metadata(secret.token("operator"))
                )
            return reports, status.tasks[0]
        finally:
            if split:
                for handle in reversed(handles):
                    await handle.stop(0.5)
            else:
                await h.stop()

    reports, status = asyncio.run(run())
    assert all(r.done for r in reports)
    outcomes = _outcomes(reports)
    # Only the last buffer may be refused: uploads that arrive after the final step.
    assert set(outcomes) <= {"accepted", "task_finished"}, outcomes
    assert outcomes.get("task_finished", 0) <= 3
    assert "duplicate_client" not in status.rejected
    rows = _ledger(tmp_path, "tee")
    applied = [v for _, s, v in rows if s == "applied"]
    assert sorted(applied) == [v for v in range(1, steps + 1) for _ in range(k)]
    assert outcomes["accepted"] == len(rows)
    # Every buffer holds K distinct devices.
    for v in range(1, steps + 1):
        assert len({c for c, s, a in rows if a == v}) == k


def test_lightsecagg_group_runs_with_the_roles_split(tmp_path: Path) -> None:
    """The selector lists the device's groups with their aggregator; registration, mailbox
    polls, answers and uploads all go there (the selector refuses them), and the task runs
    to completion with K applied contributions per step and none wasted."""
    n, k, steps = 4, 2, 3
    cfg = _config(tmp_path, [_lsa_task(n, k, steps)])
    secret = Secret.from_file(tmp_path / "secret")

    async def refused(call: Any) -> tuple[grpc.StatusCode, str]:
        try:
            res = call()
            if isinstance(res, grpc.aio.UnaryStreamCall):
                async for _ in res:
                    pass
            else:
                await res
        except grpc.aio.AioRpcError as err:
            return err.code(), str(dict(err.trailing_metadata() or ()).get(REASON_KEY, ""))
        return grpc.StatusCode.OK, ""

    async def check_in(stub: Any, client: int) -> pb.CheckInResponse:
        for _ in range(100):
            try:
                resp: pb.CheckInResponse = await stub.CheckIn(
                    pb.CheckInRequest(num_examples=5),
                    metadata=bearer_metadata(secret.token(str(client))),
                )
                return resp
            except grpc.aio.AioRpcError as err:
                # The selector's route table may predate the assignment by a heartbeat.
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err
                await asyncio.sleep(0.05)
        raise AssertionError("the selector never found the task's aggregator")

    async def run() -> list[ClientReport]:
        handles = await _split(cfg)
        agg, sel = handles[1], handles[2]
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{sel.port}") as ch:
                stub = pb_grpc.FederatedLearningStub(ch)
                md = bearer_metadata(secret.token("1"))
                first = await check_in(stub, 1)
                assert first.WhichOneof("outcome") == "retry_after_s"  # group incomplete
                assert list(first.lightsecagg_tasks) == ["lsa"]
                assert dict(first.lightsecagg_addresses) == {"lsa": agg.address}
                outsider = await check_in(stub, 9)
                assert not outsider.lightsecagg_tasks and not outsider.lightsecagg_addresses
                # The selector is not on the protocol's path.
                moved = (grpc.StatusCode.UNAVAILABLE, "task_moved")
                key = KeyPair.generate().public
                register = pb.LightSecAggRegisterRequest(task_id="lsa", public_key=key)
                assert await refused(lambda: stub.LightSecAggRegister(register, metadata=md)) == (
                    moved
                )
                poll = pb.LightSecAggPollRequest(task_id="lsa")
                assert await refused(lambda: stub.LightSecAggPoll(poll, metadata=md)) == moved
                secagg = pb.SecAggRequest(task_id="lsa")
                assert await refused(lambda: stub.SecAgg(secagg, metadata=md)) == moved
            clients = _clients(cfg, sel.port, range(n), slow_s=0.1)
            return await asyncio.wait_for(run_clients_async(clients), 40)
        finally:
            for h in reversed(handles):
                await h.stop(0.5)

    reports = asyncio.run(run())
    assert all(r.done for r in reports)
    outcomes = _outcomes(reports)
    assert set(outcomes) <= {"accepted", "task_finished"}, outcomes
    rows = _ledger(tmp_path, "lsa")
    applied = [v for _, s, v in rows if s == "applied"]
    assert sorted(applied) == [v for v in range(1, steps + 1) for _ in range(k)]
    assert {s for _, s, _ in rows} <= {"applied", "discarded"}
    assert outcomes["accepted"] == len(rows)


def test_dp_task_runs_with_the_roles_split(tmp_path: Path) -> None:
    """User-level DP with the trusted aggregator, split: the lease the selector relays
    carries the clip norm, the aggregator clips, noises and accounts every step, and the
    selector's Status reports the aggregator's epsilon (checked against an accountant
    configured by hand)."""
    k, steps, clip = 2, 3, 0.5
    task = _task(
        "dp",
        algorithm={"name": "fedbuff", "concurrency": 3, "buffer_size": k},
        max_server_steps=steps,
        population=100,
        privacy={"enabled": True, "noise_multiplier": 1.0, "clip_norm": clip},
    )
    cfg = _config(tmp_path, [task])
    secret = Secret.from_file(tmp_path / "secret")
    seen: list[float] = []

    class Clipped(_Trainer):
        def __call__(self, params: FloatVector, version: int, a: pb.Assignment) -> TrainResult:
            seen.append(a.clip_norm)
            return super().__call__(params, version, a)

    async def run() -> tuple[list[ClientReport], pb.TaskStatus]:
        handles = await _split(cfg)
        sel = handles[-1]
        try:
            clients = [(o, Clipped(o.client_id, 0.0)) for o, _ in _clients(cfg, sel.port, range(4))]
            reports = await asyncio.wait_for(run_clients_async(clients), 40)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{sel.port}") as ch:
                status = await pb_grpc.FederatedLearningStub(ch).Status(
                    pb.StatusRequest(), metadata=bearer_metadata(secret.token("operator"))
                )
            return reports, status.tasks[0]
        finally:
            for h in reversed(handles):
                await h.stop(0.5)

    reports, status = asyncio.run(run())
    assert all(r.done for r in reports)
    assert seen and set(seen) == {clip}
    rows = _ledger(tmp_path, "dp")
    assert sorted(v for _, s, v in rows if s == "applied") == [
        v for v in range(1, steps + 1) for _ in range(k)
    ]
    acc = PrivacyAccountant(
        PrivacyConfig(
            noise_multiplier=1.0,
            clip_norm=clip,
            cohort_size=k,
            population=100,
            delta=1.0 / 1000,
            sampling="async_approx",
        )
    )
    acc.record_step(steps)
    assert status.dp_enabled and status.model_version == steps
    assert status.epsilon == pytest.approx(acc.epsilon(), rel=1e-9)
