"""Crash recovery: ``kill -9`` the server mid-task, restart it, and the task completes with
every accepted update applied exactly once (checked from the ledger, the checkpoint versions,
a bit-exact replay of the ledger, and the uploads the clients saw acknowledged)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import grpc
import pytest
import yaml

from _service_util import (
    INPUT_SHAPE,
    check_ledger_exactly_once,
    finish_clients,
    free_port,
    kill_9_with_rows_buffered,
    ledger,
    reference_epsilons,
    start_clients,
    start_server,
    task_version,
    write_setup,
)
from asyncfl.core.configload import build_config
from asyncfl.service.auth import Secret, bearer_metadata
from asyncfl.service.checkpoint import read_checkpoint
from asyncfl.service.config import ServiceConfig
from asyncfl.service.proto.asyncfl.v1 import service_pb2 as pb
from asyncfl.service.proto.asyncfl.v1 import service_pb2_grpc as pb_grpc
from asyncfl.service.task import initial_params
from asyncfl.service.tee import expected_measurement_for, load_vendor, vendor_key_path


@pytest.mark.slow
def test_kill_9_mid_task_then_restart_completes_exactly_once(tmp_path: Path) -> None:
    steps, k = 16, 2
    task = {
        "id": "crash",
        "model": {"name": "logistic"},
        "input_shape": INPUT_SHAPE,
        "num_classes": 10,
        "algorithm": {"name": "fedbuff", "concurrency": 6, "buffer_size": k},
        "server_optimizer": {"name": "momentum", "lr": 1.0, "momentum": 0.5},
        "max_server_steps": steps,
    }
    port = free_port()
    config = write_setup(tmp_path, task, port, keep_applied_deltas=True)
    report = tmp_path / "uploads.jsonl"
    clients = start_clients(tmp_path, port, "0-7", report)
    server = start_server(config, port, tmp_path / "server.log")
    try:
        deadline = time.monotonic() + 40
        while task_version(tmp_path, "crash") < 5:
            assert time.monotonic() < deadline, "no progress before the crash"
            time.sleep(0.05)
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        with ledger(tmp_path) as db:
            before = db.execute("SELECT COUNT(*) FROM updates").fetchone()[0]
        assert task_version(tmp_path, "crash") < steps, "the task finished before the kill"
        server = start_server(config, port, tmp_path / "server.log")
        _, err = finish_clients(clients, 60, [server], [tmp_path / "server.log"])
        assert clients.returncode == 0, err.decode()[-3000:]
    finally:
        server.kill()
        server.wait(timeout=10)
        if clients.poll() is None:
            clients.kill()
    assert check_ledger_exactly_once(tmp_path, task, per_step=k) == steps
    with ledger(tmp_path) as db:
        rows = set(db.execute("SELECT client_id, upload_id FROM updates").fetchall())
        buffered = db.execute("SELECT COUNT(*) FROM updates WHERE status='buffered'").fetchone()
    assert len(rows) >= before  # nothing committed before the crash was lost
    assert buffered == (0,)
    acked = {
        (u["client_id"], u["upload_id"])
        for u in map(json.loads, report.read_text().splitlines())
        if u["outcome"] in ("accepted", "duplicate")
    }
    # Every update a client was told "accepted" is in the ledger, and nothing else is.
    assert acked == rows
    # The restart really recovered (the log of the second process says so).
    assert (tmp_path / "server.log").read_text().count('"task recovered"') >= 2


@pytest.mark.slow
def test_kill_9_tee_dp_task_mid_task_then_restart_completes_exactly_once(tmp_path: Path) -> None:
    """The same crash for a FedBuff task over the TEE secure buffer (enclave in its own
    process) with DP noise added in the enclave. The enclave dies with the server; the restart
    boots a new one (new key and epoch: clients re-attest and re-seal), the masked rows
    buffered at the kill are discarded (counted in the ledger and in Status), every released
    step is applied exactly once, and epsilon counts every release the server requested."""
    steps, k = 10, 3
    task = {
        "id": "teecrash",
        "model": {"name": "logistic"},
        "input_shape": INPUT_SHAPE,
        "num_classes": 10,
        "algorithm": {"name": "fedbuff", "concurrency": 6, "buffer_size": k},
        "server_optimizer": {"name": "sgd", "lr": 1.0},
        "max_server_steps": steps,
        "population": 120,
        "privacy": {"enabled": True, "noise_multiplier": 1.0, "clip_norm": 1.0},
        "secure_aggregation": {"mode": "tee", "tee_backend": "subprocess"},
    }
    port = free_port()
    config = write_setup(tmp_path, task, port, keep_applied_deltas=True)
    cfg = build_config(ServiceConfig, yaml.safe_load(config.read_text()))
    t = cfg.tasks[0]
    # What the devices trust, set up out of band (as `asyncfl tee-trust` prints it).
    vendor = load_vendor(vendor_key_path(t, Path(cfg.storage.dir)))
    measurement = expected_measurement_for(t, int(initial_params(t).shape[0]))
    trust = ["--tee-vendor-public", vendor.public.hex(), "--tee-measurement", measurement.hex()]
    report = tmp_path / "uploads.jsonl"
    clients = start_clients(tmp_path, port, "0-7", report, trust)
    server = start_server(config, port, tmp_path / "server.log")
    try:
        killed_at, lost = kill_9_with_rows_buffered(server, tmp_path, "teecrash", steps)
        server = start_server(config, port, tmp_path / "server.log")
        _, err = finish_clients(clients, 90, [server], [tmp_path / "server.log"])
        assert clients.returncode == 0, err.decode()[-3000:]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.FederatedLearningStub(ch)  # type: ignore[no-untyped-call]
            token = Secret.from_file(tmp_path / "secret").token("operator")
            (status,) = stub.Status(
                pb.StatusRequest(), metadata=bearer_metadata(token), timeout=10
            ).tasks
    finally:
        server.kill()
        server.wait(timeout=10)
        if clients.poll() is None:
            clients.kill()

    with ledger(tmp_path) as db:
        version, ckpt_name = db.execute("SELECT version, checkpoint FROM tasks").fetchone()
        rows = db.execute(
            "SELECT seq, client_id, upload_id, status, applied_version, accepted_version, delta "
            "FROM updates ORDER BY seq"
        ).fetchall()
        notes = dict(db.execute("SELECT version, releases FROM release_notes").fetchall())
    assert version == steps
    # Exactly once: K masked rows per released version, no upload twice, nothing left over.
    applied = [r for r in rows if r[3] == "applied"]
    per_version: dict[int, int] = {}
    for r in applied:
        per_version[r[4]] = per_version.get(r[4], 0) + 1
    assert per_version == {v: k for v in range(1, steps + 1)}
    assert len({(r[1], r[2]) for r in rows}) == len(rows)
    dim = int(initial_params(t).shape[0])
    assert all(r[6] is not None and len(r[6]) in (4 * dim, 8 * dim) for r in applied)  # masked
    # Lost by design: exactly the rows buffered at the kill, all accepted at that version.
    discarded = [r for r in rows if r[3] == "discarded"]
    assert {r[0] for r in discarded} == lost and lost
    assert all(r[5] == killed_at and r[6] is None for r in discarded)
    assert len(applied) + len(discarded) == len(rows)
    # Every update a client was told "accepted" is in the ledger (applied or discarded).
    acked = {
        (u["client_id"], u["upload_id"])
        for u in map(json.loads, report.read_text().splitlines())
        if u["outcome"] in ("accepted", "duplicate")
    }
    assert acked == {(r[1], r[2]) for r in rows}
    # Status counts both honestly.
    assert status.accepted_updates == len(rows) and status.discarded_updates == len(lost)
    # Privacy: every release the server requested is spent, one per step plus at most the one
    # requested at the kill whose step never committed.
    spent = sum(notes.values())
    assert steps <= spent <= steps + 1 and set(notes) <= set(range(steps))
    final = read_checkpoint(tmp_path / "state" / "checkpoints" / ckpt_name)
    assert final.privacy is not None
    assert sum(r["count"] for r in json.loads(final.privacy)["runs"]) == spent
    (eps,) = reference_epsilons(
        spent, noise_multiplier=1.0, clip_norm=1.0, cohort_size=k, population=120
    )[-1:]
    assert status.epsilon == pytest.approx(eps, rel=1e-9)
    log = (tmp_path / "server.log").read_text()
    assert log.count('"task recovered"') >= 2 and "masked buffer discarded" in log
