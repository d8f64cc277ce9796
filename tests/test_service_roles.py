"""Roles in separate processes, without OS processes: the ownership state machine (fake
clock), the ledger's epoch fence, the roles' config, and coordinator + aggregators + selectors
in one event loop over TLS on 127.0.0.1 (routing, leases decided by the owner, internal auth,
an aggregator crash whose task another aggregator recovers exactly once)."""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from _service_util import check_ledger_exactly_once, free_port, ledger
from asyncfl.core.configload import build_config
from asyncfl.errors import ConfigError
from asyncfl.service.auth import Secret, bearer_metadata
from asyncfl.service.client import ClientOptions, TrainResult, run_clients_async
from asyncfl.service.config import ServiceConfig, TaskConfig
from asyncfl.service.errors import REASON_KEY
from asyncfl.service.ownership import OwnerBook, OwnerRecord, Ownership
from asyncfl.service.proto.asyncfl.v1 import internal_pb2 as ipb
from asyncfl.service.proto.asyncfl.v1 import internal_pb2_grpc as ipb_grpc
from asyncfl.service.proto.asyncfl.v1 import service_pb2 as pb
from asyncfl.service.proto.asyncfl.v1 import service_pb2_grpc as pb_grpc
from asyncfl.service.roles import (
    RoleHandle,
    start_aggregator,
    start_coordinator,
    start_selector,
)
from asyncfl.service.store import LedgerRow, Store
from asyncfl.service.task import TaskRuntime
from asyncfl.service.tls import write_self_signed

SC = grpc.StatusCode


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


# -- ownership ------------------------------------------------------------------------------
def _own(clock: Clock, book: OwnerBook | None = None, **allowed: tuple[str, ...]) -> Ownership:
    return Ownership(["t1", "t2", "t3"], allowed or {"a": (), "b": ()}, 3.0, clock, book, 1.0)


def test_tasks_spread_over_aggregators_after_settling() -> None:
    clock = Clock()
    own = _own(clock)
    assert own.heartbeat("a", "a1", "h:1") == {}  # settling: b may still be starting
    clock.t = 0.5
    assert own.heartbeat("b", "b1", "h:2") == {}
    clock.t = 1.5
    got_a = own.heartbeat("a", "a1", "h:1")
    got_b = own.heartbeat("b", "b1", "h:2")
    got_a |= own.heartbeat("a", "a1", "h:1")
    assert set(got_a) | set(got_b) == {"t1", "t2", "t3"}
    assert not set(got_a) & set(got_b)
    assert {len(got_a), len(got_b)} == {1, 2}
    assert set(got_a.values()) | set(got_b.values()) == {1}
    assert {r.task_id: r.address for r in own.routes()} == {
        **dict.fromkeys(got_a, "h:1"),
        **dict.fromkeys(got_b, "h:2"),
    }
    with pytest.raises(KeyError):
        own.heartbeat("c", "c1", "h:3")  # not configured


def test_silent_owner_loses_its_tasks_with_a_new_epoch() -> None:
    clock = Clock()
    own = _own(clock, a=(), b=())
    clock.t = 2.0
    assert set(own.heartbeat("a", "a1", "h:1")) == {"t1", "t2", "t3"}  # b not started yet
    assert own.heartbeat("b", "b1", "h:2") == {}  # nothing moves while a is alive
    clock.t = 4.9
    assert own.heartbeat("b", "b1", "h:2") == {}
    assert {r.aggregator_id for r in own.routes()} == {"a"}
    clock.t = 5.1  # a silent for more than ttl_s = 3
    assert {r.aggregator_id for r in own.routes()} == {""}
    assert own.heartbeat("b", "b1", "h:2") == {"t1": 2, "t2": 2, "t3": 2}
    # a comes back (it was only slow): the tasks stay with b; a holds nothing.
    assert own.heartbeat("a", "a1", "h:1") == {}


def test_restarted_aggregator_waits_for_its_old_instance_then_takes_its_tasks_back() -> None:
    clock = Clock()
    own = _own(clock, a=(), b=())
    clock.t = 2.0
    assert set(own.heartbeat("a", "a1", "h:1")) == {"t1", "t2", "t3"}
    own.heartbeat("b", "b1", "h:2")
    clock.t = 3.0
    # A second process with a's id while a1 may still run: it waits.
    assert own.heartbeat("a", "a2", "h:9") == {}
    clock.t = 5.5  # a1 silent for 3.5 s; a2 is the live a now
    # b beats first but leaves a's tasks to a (sticky), whose new instance takes them back.
    assert own.heartbeat("b", "b1", "h:2") == {}
    assert own.heartbeat("a", "a2", "h:9") == {"t1": 2, "t2": 2, "t3": 2}
    assert {r.address for r in own.routes()} == {"h:9"}


def test_leaving_gives_tasks_back_at_once_and_allowed_tasks_are_respected() -> None:
    clock = Clock()
    own = _own(clock, a=(), b=("t2",))
    clock.t = 2.0
    own.heartbeat("b", "b1", "h:2")
    assert own.heartbeat("b", "b1", "h:2") == {"t2": 1}  # b may own t2 only
    assert own.heartbeat("a", "a1", "h:1") == {"t1": 1, "t3": 1}
    assert own.heartbeat("b", "b1", "h:2", leaving=True) == {}
    assert own.heartbeat("a", "a1", "h:1") == {"t1": 1, "t2": 2, "t3": 1}


def test_owners_are_durable_across_a_coordinator_restart(tmp_path: Path) -> None:
    clock = Clock()
    book = OwnerBook(tmp_path / "ledger.sqlite")
    own = _own(clock, book)
    clock.t = 2.0
    assert set(own.heartbeat("a", "a1", "h:1")) == {"t1", "t2", "t3"}
    book.close()
    book = OwnerBook(tmp_path / "ledger.sqlite")
    assert {r.epoch for r in book.load()} == {1}
    clock.t = 10.0
    own = _own(clock, book)  # restarted: a keeps its tasks for ttl_s, b gets nothing
    assert {r.aggregator_id for r in own.routes()} == {"a"}
    clock.t = 11.5
    assert own.heartbeat("b", "b1", "h:2") == {}
    assert own.heartbeat("a", "a1", "h:1") == {"t1": 1, "t2": 1, "t3": 1}
    clock.t = 15.0  # a silent since 11.5
    assert own.heartbeat("b", "b1", "h:2") == {"t1": 2, "t2": 2, "t3": 2}
    assert {(r.aggregator_id, r.epoch) for r in book.load()} == {("b", 2)}
    book.close()


# -- the epoch fence ------------------------------------------------------------------------
def _task(**kw: Any) -> TaskConfig:
    base = {
        "id": "t",
        "model": {"name": "logistic"},
        "input_shape": [4],
        "num_classes": 3,
        "algorithm": {"name": "fedbuff", "concurrency": 4, "buffer_size": 2},
        "max_server_steps": 50,
    }
    return build_config(TaskConfig, {**base, **kw})


def test_fenced_writer_cannot_touch_a_task_that_moved(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    book = OwnerBook(path)
    book.save(OwnerRecord("t", "a", "a1", "h:1", 1))
    old = Store(path)
    old.fence("t", 1)
    rt = TaskRuntime(_task(), old, tmp_path / "ckpt")
    dim = rt.dim
    rng = np.random.default_rng(0)
    rt.submit(1, "u1", 0, 5, rng.normal(size=dim).astype(np.float32))
    book.save(OwnerRecord("t", "b", "b1", "h:2", 2))  # the coordinator moved the task
    before = (rt.version, rt.agg.buffered, old.counts("t"))
    with pytest.raises(Exception) as info:  # ServiceError("internal") after the rollback
        rt.submit(2, "u2", 0, 5, rng.normal(size=dim).astype(np.float32))
    assert getattr(info.value, "reason", None) == "internal"
    assert (rt.version, rt.agg.buffered, old.counts("t")) == before
    with pytest.raises(sqlite3.IntegrityError, match="ownership moved"):
        old.commit("t", [], discard=True)
    # The new owner (its own connection, fenced with epoch 2) writes, and sees u1 buffered.
    new = Store(path)
    new.fence("t", 2)
    rt2 = TaskRuntime(_task(), new, tmp_path / "ckpt")
    assert rt2.agg.buffered == 1
    out = rt2.submit(3, "u3", 0, 5, rng.normal(size=dim).astype(np.float32))
    assert out.stepped and rt2.version == 1
    # A row for another task is not fenced on the old connection.
    old.commit("other", [LedgerRow("other", 1, "x", 0, 1, 0, 0, 1.0)])
    for s in (old, new):
        s.close()
    book.close()


# -- config ---------------------------------------------------------------------------------
def test_roles_config_reports_every_problem() -> None:
    with pytest.raises(ConfigError) as info:
        build_config(
            ServiceConfig,
            {
                "server": {"host": "127.0.0.1", "insecure": True},
                "auth": {"secret_file": "s", "operator_principal": "ops"},
                "tasks": [{"id": "t"}],
                "roles": {
                    "coordinator": "10.1.2.3:50052",
                    "heartbeat_s": 1.0,
                    "owner_ttl_s": 2.0,
                    "internal_principal": "ops",
                    "aggregators": [
                        {"id": "a", "listen": "127.0.0.1", "tasks": ["nope"]},
                        {"id": "a", "listen": "127.0.0.1:0", "advertise": "example.com:1"},
                    ],
                },
            },
        )
    fields = {p.path for p in info.value.problems}
    assert {
        "roles.coordinator",
        "roles.owner_ttl_s",
        "roles.internal_principal",
        "roles.aggregators",
        "roles.aggregators[0].listen",
        "roles.aggregators[0].tasks",
        "roles.aggregators[1].advertise",
    } <= fields, fields


# -- over gRPC, in one event loop -----------------------------------------------------------
def _config(tmp: Path, task: dict[str, Any], aggregators: list[dict[str, Any]]) -> ServiceConfig:
    cert, key = write_self_signed(tmp / "tls")
    (tmp / "secret").write_text(secrets.token_hex(32))
    return build_config(
        ServiceConfig,
        {
            "server": {
                "host": "127.0.0.1",
                "port": free_port(),
                "tls_cert": str(cert),
                "tls_key": str(key),
            },
            "auth": {"secret_file": str(tmp / "secret")},
            "storage": {"dir": str(tmp / "state"), "keep_applied_deltas": True},
            "selector": {"retry_after_s": 0.05},
            "roles": {
                "coordinator": f"127.0.0.1:{free_port()}",
                "heartbeat_s": 0.1,
                "owner_ttl_s": 1.0,
                "aggregators": aggregators,
            },
            "tasks": [task],
        },
    )


TASK: dict[str, Any] = {
    "id": "t",
    "model": {"name": "logistic"},
    "algorithm": {"name": "fedbuff", "concurrency": 3, "buffer_size": 2},
    "server_optimizer": {"name": "momentum", "lr": 1.0, "momentum": 0.5},
    "max_server_steps": 14,
}


def _trainer(params: Any, version: int, a: pb.Assignment) -> TrainResult:
    # Asymmetric, version-dependent deltas: a replay that applied one twice would differ.
    rng = np.random.default_rng(version * 1000 + len(a.lease_id))
    return TrainResult((0.01 * rng.normal(size=params.shape)).astype(np.float32), 3 + version % 4)


async def _until(cond: Any, timeout_s: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.02)


def _owner(aggs: list[RoleHandle]) -> RoleHandle | None:
    found = [h for h in aggs if h.core is not None and "t" in h.core.tasks]
    assert len(found) <= 1
    return found[0] if found else None


async def _reason(coro: Any) -> tuple[SC, str]:
    try:
        await coro
    except grpc.aio.AioRpcError as err:
        return err.code(), str(dict(err.trailing_metadata() or ()).get(REASON_KEY, ""))
    return SC.OK, ""


def test_owner_decides_leases_and_roles_refuse_each_others_calls(tmp_path: Path) -> None:
    cfg = _config(tmp_path, TASK, [{"id": "a", "listen": "127.0.0.1:0"}])
    secret = Secret.from_file(tmp_path / "secret")
    ca = Path(cfg.server.tls_cert or "").read_bytes()
    creds = grpc.ssl_channel_credentials(root_certificates=ca)

    async def main() -> None:
        coord = await start_coordinator(cfg)
        agg = await start_aggregator(cfg, "a")
        sel1 = await start_selector(cfg)
        # A second selector on another port, same config: the owner still counts the slots.
        cfg2 = build_config(
            ServiceConfig,
            {**_plain(cfg), "server": {**_plain(cfg)["server"], "port": free_port()}},
        )
        sel2 = await start_selector(cfg2)
        try:
            await _until(lambda: _owner([agg]) is not None, 20, "task never assigned")
            got = []
            async with (
                grpc.aio.secure_channel(f"127.0.0.1:{sel1.port}", creds) as c1,
                grpc.aio.secure_channel(f"127.0.0.1:{sel2.port}", creds) as c2,
            ):
                stubs = [pb_grpc.FederatedLearningStub(c) for c in (c1, c2)]
                for cid in range(8):
                    for _ in range(100):
                        try:
                            resp = await stubs[cid % 2].CheckIn(
                                pb.CheckInRequest(num_examples=5),
                                metadata=bearer_metadata(secret.token(str(cid))),
                            )
                            break
                        except grpc.aio.AioRpcError as err:
                            # A selector whose route table predates the assignment: no slot
                            # was taken, the client retries.
                            assert err.code() == SC.UNAVAILABLE, err
                            await asyncio.sleep(0.05)
                    got.append(resp.WhichOneof("outcome"))
                assert got.count("assignment") == 3  # the concurrency target, across selectors
                assert got.count("retry_after_s") == 5
                # The selector is not on the data path; the internal principal is no client.
                internal = bearer_metadata(secret.token(cfg.roles.internal_principal))
                assert await _reason(
                    stubs[0]
                    .DownloadModel(
                        pb.DownloadRequest(task_id="t"), metadata=bearer_metadata(secret.token("1"))
                    )
                    .read()
                ) == (SC.UNAVAILABLE, "task_moved")
                assert await _reason(
                    stubs[0].CheckIn(pb.CheckInRequest(num_examples=5), metadata=internal)
                ) == (SC.PERMISSION_DENIED, "permission_denied")
                status = await stubs[0].Status(
                    pb.StatusRequest(), metadata=bearer_metadata(secret.token("operator"))
                )
                assert [(s.task_id, s.active_clients) for s in status.tasks] == [("t", 3)]
            async with grpc.aio.secure_channel(agg.address, creds) as ca_:
                lease = ipb_grpc.AggregatorRoleStub(ca_).AcquireLease
                req = ipb.LeaseRequest(task_id="t", client_id=9)
                client_md = bearer_metadata(secret.token("9"))
                assert await _reason(lease(req, metadata=client_md)) == (
                    SC.PERMISSION_DENIED,
                    "permission_denied",
                )
                ok = await lease(req, metadata=internal)
                assert ok.WhichOneof("outcome") == "full"
            async with grpc.aio.secure_channel(cfg.roles.coordinator, creds) as cc:
                beat = ipb_grpc.CoordinatorRoleStub(cc).Heartbeat
                hb = ipb.HeartbeatRequest(aggregator_id="x", instance="i", address="h:1")
                assert await _reason(beat(hb, metadata=internal)) == (
                    SC.PERMISSION_DENIED,
                    "permission_denied",
                )
                assert await _reason(beat(hb, metadata=client_md)) == (
                    SC.PERMISSION_DENIED,
                    "permission_denied",
                )
        finally:
            for h in (sel1, sel2, agg, coord):
                await h.stop(0.5)

    asyncio.run(main())


def _plain(cfg: ServiceConfig) -> dict[str, Any]:
    from asyncfl.core.configload import to_plain

    out = to_plain(cfg)
    assert isinstance(out, dict)
    return out


def test_crashed_aggregator_task_moves_to_another_and_finishes_exactly_once(
    tmp_path: Path,
) -> None:
    cfg = _config(
        tmp_path,
        TASK,
        [{"id": "a", "listen": "127.0.0.1:0"}, {"id": "b", "listen": "127.0.0.1:0"}],
    )
    secret = Secret.from_file(tmp_path / "secret")
    ca = Path(cfg.server.tls_cert or "").read_bytes()

    async def main() -> None:
        coord = await start_coordinator(cfg)
        aggs = [await start_aggregator(cfg, "a"), await start_aggregator(cfg, "b")]
        sel = await start_selector(cfg)
        first: RoleHandle | None = None
        try:
            clients = [
                (
                    ClientOptions(
                        address=f"127.0.0.1:{sel.port}",
                        token=secret.token(str(c)),
                        client_id=c,
                        num_examples=5,
                        ca_cert=ca,
                        backoff_cap_s=0.3,
                    ),
                    _trainer,
                )
                for c in range(6)
            ]
            run = asyncio.create_task(run_clients_async(clients))
            await _until(
                lambda: (
                    (o := _owner(aggs)) is not None
                    and o.core is not None
                    and o.core.tasks["t"].runtime.version >= 4
                ),
                30,
                "no progress before the crash",
            )
            first = _owner(aggs)
            assert first is not None and first.core is not None
            at_crash = first.core.tasks["t"].runtime.version
            await first.stop(0, leave=False)  # a crash: its task moves only after owner_ttl_s
            assert at_crash < TASK["max_server_steps"], "finished before the crash"
            other = next(h for h in aggs if h is not first)
            await _until(lambda: _owner([other]) is not None, 20, "the task never moved")
            reports = await asyncio.wait_for(run, 60)
            assert all(r.done for r in reports)
            acked = {(r.client_id, u.upload_id) for r in reports for u in r.uploads
                     if u.outcome in ("accepted", "duplicate")}  # fmt: skip
        finally:
            for h in (sel, *aggs, coord):
                if h is not first:
                    await h.stop(0.5)
        assert check_ledger_exactly_once(tmp_path, TASK, per_step=2) == TASK["max_server_steps"]
        with ledger(tmp_path) as db:
            rows = set(db.execute("SELECT client_id, upload_id FROM updates").fetchall())
            epoch = db.execute("SELECT epoch FROM task_owners WHERE task_id = 't'").fetchone()
        assert acked == rows  # every acknowledged update is in the ledger, nothing else
        assert epoch == (2,)

    asyncio.run(main())


def test_one_process_server_locates_its_own_tasks(tmp_path: Path) -> None:
    from asyncfl.service.server import start_server

    cfg = _config(tmp_path, TASK, [{"id": "a"}])
    secret = Secret.from_file(tmp_path / "secret")
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(cfg.server.tls_cert or "").read_bytes()
    )

    async def main() -> None:
        handle = await start_server(cfg)
        try:
            async with grpc.aio.secure_channel(f"127.0.0.1:{handle.port}", creds) as ch:
                stub = pb_grpc.FederatedLearningStub(ch)
                md = bearer_metadata(secret.token("4"))
                here = await stub.Locate(pb.LocateRequest(task_id="t"), metadata=md)
                assert here.aggregator_address == ""  # this server serves it
                missing = stub.Locate(pb.LocateRequest(task_id="zz"), metadata=md)
                assert await _reason(missing) == (SC.NOT_FOUND, "unknown_task")
                resp = await stub.CheckIn(pb.CheckInRequest(num_examples=5), metadata=md)
                assert resp.assignment.aggregator_address == ""  # old clients keep working
        finally:
            await handle.stop(0.5)

    asyncio.run(main())


def test_plaintext_client_refuses_a_remote_aggregator() -> None:
    from asyncfl.service.client import ClientError, _Session

    async def main() -> None:
        opts = ClientOptions(address="127.0.0.1:1", token="1.x", client_id=1, num_examples=1)
        async with grpc.aio.insecure_channel(opts.address) as ch:
            s = _Session(opts, _trainer, ch)
            assert s._data_stub("") is s.stub
            s._data_stub("127.0.0.1:2")  # loopback: allowed in plaintext
            with pytest.raises(ClientError, match="plaintext"):
                s._data_stub("10.0.0.7:50053")
            await s.close()

    asyncio.run(main())


def test_serve_role_flags_are_checked_before_serving(tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from asyncfl.cli.main import app

    (tmp_path / "secret").write_text(secrets.token_hex(32))
    cfg = {
        "server": {"host": "127.0.0.1", "port": 0, "insecure": True},
        "auth": {"secret_file": str(tmp_path / "secret")},
        "storage": {"dir": str(tmp_path / "state")},
        "roles": {"aggregators": [{"id": "a"}, {"id": "b", "listen": "127.0.0.1:0"}]},
    }
    path = tmp_path / "server.yaml"
    path.write_text(yaml.safe_dump(cfg))
    runner = CliRunner()
    for args, needle in (
        (["--role", "boss"], "one of all"),
        (["--role", "selector", "--id", "a"], "with --role aggregator"),
        (["--role", "aggregator"], "give --id"),
        (["--role", "aggregator", "--id", "z"], "roles.aggregators has"),
    ):
        res = runner.invoke(app, ["serve", str(path), *args])
        assert res.exit_code == 2, (args, res.output)
        assert needle in " ".join(res.output.split()), (args, res.output)


def test_fedavg_rounds_run_in_the_aggregator_process(tmp_path: Path) -> None:
    task = {
        **TASK,
        "id": "t",
        "algorithm": {
            "name": "fedavg",
            "cohort_size": 3,
            "over_selection": 0.34,
            "round_deadline_s": 10.0,
        },
        "max_server_steps": 4,
    }
    cfg = _config(tmp_path, task, [{"id": "a", "listen": "127.0.0.1:0"}])
    secret = Secret.from_file(tmp_path / "secret")
    ca = Path(cfg.server.tls_cert or "").read_bytes()

    async def main() -> list[Any]:
        handles = [
            await start_coordinator(cfg),
            await start_aggregator(cfg, "a"),
            await start_selector(cfg),
        ]
        try:
            clients = [
                (
                    ClientOptions(
                        address=f"127.0.0.1:{handles[2].port}",
                        token=secret.token(str(c)),
                        client_id=c,
                        num_examples=5,
                        ca_cert=ca,
                        backoff_cap_s=0.3,
                    ),
                    _trainer,
                )
                for c in range(7)
            ]
            return await asyncio.wait_for(run_clients_async(clients), 60)
        finally:
            for h in reversed(handles):
                await h.stop(0.5)

    reports = asyncio.run(main())
    assert all(r.done for r in reports)
    # ceil(3 x 1.34) = 5 selected per round, the first 3 uploads step, the rest are late.
    assert check_ledger_exactly_once(tmp_path, task, per_step=3) == 4
    outcomes = {u.outcome for r in reports for u in r.uploads}
    assert outcomes <= {"accepted", "duplicate", "late", "task_finished"}
