"""Roles as separate OS processes on 127.0.0.1: ``asyncfl serve --role coordinator``,
``--role selector`` and ``--role aggregator`` with client processes that know only the
selector's address. A FedBuff task runs to completion with the ledger exactly once; then the
aggregator is killed with SIGKILL mid-task, restarted on the same storage, and the task
finishes with every accepted update applied exactly once. The secure modes the same way: a
FedBuff task over the TEE buffer with DP (enclave in its own process beside the aggregator)
and a FedAvg task with SecAgg rounds, each to completion with its ledger exactly once and no
model, update or protocol message through the selector."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from _service_util import (
    INPUT_SHAPE,
    check_ledger_exactly_once,
    check_secure_ledger_exactly_once,
    finish_clients,
    free_port,
    kill_9_with_rows_buffered,
    ledger,
    reference_epsilons,
    start_clients,
    task_version,
    write_setup,
)
from asyncfl.core.configload import build_config
from asyncfl.service.auth import Secret, bearer_metadata
from asyncfl.service.config import ServiceConfig
from asyncfl.service.proto.asyncfl.v1 import service_pb2 as pb
from asyncfl.service.proto.asyncfl.v1 import service_pb2_grpc as pb_grpc
from asyncfl.service.task import initial_params
from asyncfl.service.tee import expected_measurement_for, load_vendor, vendor_key_path

TASK: dict[str, Any] = {
    "model": {"name": "mlp", "hidden": [16]},
    "client": {"epochs": 1, "batch_size": 16, "lr": 0.1},
    "input_shape": INPUT_SHAPE,
    "num_classes": 10,
    "server_optimizer": {"name": "momentum", "lr": 1.0, "momentum": 0.5},
}


def _setup(tmp: Path, task: dict[str, Any]) -> tuple[Path, dict[str, int]]:
    ports = {"selector": free_port(), "coordinator": free_port(), "aggregator": free_port()}
    config = write_setup(tmp, task, ports["selector"], keep_applied_deltas=True)
    raw = yaml.safe_load(config.read_text())
    raw["roles"] = {
        "coordinator": f"127.0.0.1:{ports['coordinator']}",
        "aggregators": [{"id": "agg-a", "listen": f"127.0.0.1:{ports['aggregator']}"}],
        "heartbeat_s": 0.25,
        "owner_ttl_s": 2.0,
    }
    config.write_text(yaml.safe_dump(raw))
    return config, ports


def _spawn(config: Path, role: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "asyncfl.cli", "serve", str(config), "--role", role],
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
    )


def _wait_listening(procs: dict[str, subprocess.Popen[bytes]], ports: dict[str, int]) -> None:
    """Every role process listens (they start in parallel: imports dominate start-up)."""
    deadline = time.monotonic() + 40
    for role, proc in procs.items():
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{role} exited with {proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", ports[role]), timeout=0.2):
                    break
            except OSError:
                assert time.monotonic() < deadline, f"{role} did not listen within 40 s"
                time.sleep(0.1)


def _stop(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    for p in procs.values():
        if p.poll() is None:
            p.terminate()
    for p in procs.values():
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


def _acked(report: Path) -> set[tuple[int, str]]:
    return {
        (u["client_id"], u["upload_id"])
        for u in map(json.loads, report.read_text().splitlines())
        if u["outcome"] in ("accepted", "duplicate")
    }


@pytest.mark.slow
def test_separate_role_processes_run_a_fedbuff_task_to_completion(tmp_path: Path) -> None:
    steps, k = 12, 3
    task = {
        "id": "split",
        "algorithm": {"name": "fedbuff", "concurrency": 6, "buffer_size": k},
        "max_server_steps": steps,
        **TASK,
    }
    config, ports = _setup(tmp_path, task)
    report = tmp_path / "uploads.jsonl"
    clients = [start_clients(tmp_path, ports["selector"], ids, report) for ids in ("0-5", "6-11")]
    logs = {r: tmp_path / f"{r}.log" for r in ports}
    procs = {r: _spawn(config, r, logs[r]) for r in ("coordinator", "aggregator", "selector")}
    try:
        _wait_listening(procs, ports)
        for c in clients:
            out, err = finish_clients(c, 60, list(procs.values()), list(logs.values()))
            assert c.returncode == 0, err.decode()[-3000:]
            assert json.loads(out.decode().strip().splitlines()[-1])["clients"] == 6
        # Read the owner while the roles still run: at shutdown the aggregator gives its
        # task back ("leaving"), and whether the coordinator records that before it stops
        # itself is a race.
        with ledger(tmp_path) as db:
            owner = db.execute("SELECT aggregator_id FROM task_owners").fetchall()
    finally:
        _stop(procs)
        for c in clients:
            if c.poll() is None:
                c.kill()
    assert check_ledger_exactly_once(tmp_path, task, per_step=k) == steps
    with ledger(tmp_path) as db:
        rows = set(db.execute("SELECT client_id, upload_id FROM updates").fetchall())
    assert _acked(report) == rows
    assert len(rows) == k * steps
    assert owner == [("agg-a",)]
    # The data path bypassed the selector: the aggregator accepted every update.
    text = {r: p.read_text() for r, p in logs.items()}
    assert text["aggregator"].count('"update accepted"') == k * steps
    assert '"update accepted"' not in text["selector"] + text["coordinator"]


@pytest.mark.slow
def test_kill_9_aggregator_then_restart_on_same_storage_finishes_exactly_once(
    tmp_path: Path,
) -> None:
    steps, k = 16, 2
    task = {
        "id": "crash",
        "algorithm": {"name": "fedbuff", "concurrency": 6, "buffer_size": k},
        "max_server_steps": steps,
        **TASK,
    }
    config, ports = _setup(tmp_path, task)
    report = tmp_path / "uploads.jsonl"
    clients = start_clients(tmp_path, ports["selector"], "0-7", report)
    logs = {r: tmp_path / f"{r}.log" for r in ports}
    procs = {r: _spawn(config, r, logs[r]) for r in ("coordinator", "aggregator", "selector")}
    try:
        _wait_listening(procs, ports)
        deadline = time.monotonic() + 40
        while task_version(tmp_path, "crash") < 5:
            assert time.monotonic() < deadline, "no progress before the crash"
            time.sleep(0.05)
        procs["aggregator"].send_signal(signal.SIGKILL)
        procs["aggregator"].wait(timeout=10)
        with ledger(tmp_path) as db:
            before = set(db.execute("SELECT client_id, upload_id FROM updates").fetchall())
        assert task_version(tmp_path, "crash") < steps, "the task finished before the kill"
        procs["aggregator"] = _spawn(config, "aggregator", logs["aggregator"])
        _wait_listening({"aggregator": procs["aggregator"]}, ports)
        # 150 s, not 60: once in ~10 loaded full-suite runs every client went silent for
        # ~55 s after the restart (the aggregator and selector idle, the ledger consistent);
        # the client's RPC deadline is 60 s, so a hung call recovers within this bound.
        # Cause not found yet (docs/service.md, "Not yet"); a timeout here reports every
        # process's asyncio tasks.
        _, err = finish_clients(clients, 150, list(procs.values()), list(logs.values()))
        assert clients.returncode == 0, err.decode()[-3000:]
    finally:
        _stop(procs)
        if clients.poll() is None:
            clients.kill()
    assert check_ledger_exactly_once(tmp_path, task, per_step=k) == steps
    with ledger(tmp_path) as db:
        rows = set(db.execute("SELECT client_id, upload_id FROM updates").fetchall())
        buffered = db.execute("SELECT COUNT(*) FROM updates WHERE status='buffered'").fetchone()
        epoch = db.execute("SELECT epoch FROM task_owners WHERE task_id='crash'").fetchone()
    assert before <= rows  # nothing committed before the kill was lost
    assert buffered == (0,)
    assert _acked(report) == rows  # acknowledged == in the ledger, nothing else
    # The restarted process took the task over from the dead one (a new epoch) and recovered.
    assert epoch == (2,)
    assert logs["aggregator"].read_text().count('"task recovered"') >= 2


def _status(tmp: Path, port: int) -> pb.TaskStatus:
    """The operator's view through the selector (merged from the aggregator)."""
    token = Secret.from_file(tmp / "secret").token("operator")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.FederatedLearningStub(ch)  # type: ignore[no-untyped-call]
        md = bearer_metadata(token)
        (status,) = stub.Status(pb.StatusRequest(), metadata=md, timeout=10).tasks
    return status


def _run_split(
    tmp: Path, task: dict[str, Any], ids: str, extra: list[str] | None = None
) -> tuple[list[dict[str, Any]], pb.TaskStatus, dict[str, str]]:
    """Coordinator, aggregator and selector processes and one client process that knows
    the selector only, until the task is done. Returns the uploads the clients report, the
    Status seen through the selector at the end, and each role's log."""
    config, ports = _setup(tmp, task)
    extra = list(extra or ())
    if task.get("secure_aggregation", {}).get("mode") == "tee":
        extra += _tee_trust(config)
    report = tmp / "uploads.jsonl"
    clients = start_clients(tmp, ports["selector"], ids, report, extra)
    logs = {r: tmp / f"{r}.log" for r in ports}
    procs = {r: _spawn(config, r, logs[r]) for r in ("coordinator", "aggregator", "selector")}
    try:
        _wait_listening(procs, ports)
        _, err = finish_clients(clients, 90, list(procs.values()), list(logs.values()))
        assert clients.returncode == 0, err.decode()[-3000:]
        status = _status(tmp, ports["selector"])
    finally:
        _stop(procs)
        if clients.poll() is None:
            clients.kill()
    uploads = [json.loads(line) for line in report.read_text().splitlines()]
    return uploads, status, {r: p.read_text() for r, p in logs.items()}


def _tee_trust(config: Path) -> list[str]:
    """The devices' trust anchor, handed out of band (what `asyncfl tee-trust` prints)."""
    cfg = build_config(ServiceConfig, yaml.safe_load(config.read_text()))
    t = cfg.tasks[0]
    vendor = load_vendor(vendor_key_path(t, Path(cfg.storage.dir)))
    measurement = expected_measurement_for(t, int(initial_params(t).shape[0]))
    return ["--tee-vendor-public", vendor.public.hex(), "--tee-measurement", measurement.hex()]


@pytest.mark.slow
def test_kill_9_tee_aggregator_process_then_restart_discards_its_buffer_once(
    tmp_path: Path,
) -> None:
    """Roles as processes, a TEE task (enclave in its own process under the aggregator):
    SIGKILL the aggregator while masked rows are buffered. Its enclave dies with it; the
    restarted aggregator takes the task over (epoch 2), boots a new enclave (clients
    re-attest), discards exactly the rows buffered at the kill, and the task completes with
    K masked rows applied per version and every acknowledged upload in the ledger."""
    steps, k = 10, 3
    task = {
        "id": "teecrash",
        "algorithm": {"name": "fedbuff", "concurrency": 6, "buffer_size": k},
        "max_server_steps": steps,
        "secure_aggregation": {"mode": "tee", "tee_backend": "subprocess"},
        **TASK,
        "model": {"name": "logistic"},
        "server_optimizer": {"name": "sgd", "lr": 1.0},
    }
    config, ports = _setup(tmp_path, task)
    report = tmp_path / "uploads.jsonl"
    clients = start_clients(tmp_path, ports["selector"], "0-7", report, _tee_trust(config))
    logs = {r: tmp_path / f"{r}.log" for r in ports}
    procs = {r: _spawn(config, r, logs[r]) for r in ("coordinator", "aggregator", "selector")}
    agg = procs["aggregator"]
    try:
        _wait_listening(procs, ports)
        killed_at, lost = kill_9_with_rows_buffered(agg, tmp_path, "teecrash", steps)
        procs["aggregator"] = _spawn(config, "aggregator", logs["aggregator"])
        _wait_listening({"aggregator": procs["aggregator"]}, ports)
        _, err = finish_clients(clients, 150, list(procs.values()), list(logs.values()))
        assert clients.returncode == 0, err.decode()[-3000:]
        status = _status(tmp_path, ports["selector"])
    finally:
        _stop(procs)
        if clients.poll() is None:
            clients.kill()
    with ledger(tmp_path) as db:
        version = db.execute("SELECT version FROM tasks").fetchone()[0]
        rows = db.execute(
            "SELECT seq, client_id, upload_id, status, applied_version, accepted_version "
            "FROM updates"
        ).fetchall()
        epoch = db.execute("SELECT epoch FROM task_owners WHERE task_id='teecrash'").fetchone()
    assert version == steps and epoch == (2,)
    per_version: dict[int, int] = {}
    for r in rows:
        if r[3] == "applied":
            per_version[r[4]] = per_version.get(r[4], 0) + 1
    assert per_version == dict.fromkeys(range(1, steps + 1), k)  # each release applied once
    discarded = [r for r in rows if r[3] == "discarded"]
    assert lost and {r[0] for r in discarded} == lost  # exactly those buffered at the kill
    assert all(r[5] == killed_at for r in discarded)
    assert {r[3] for r in rows} <= {"applied", "discarded", "buffered"}
    acked = {
        (u["client_id"], u["upload_id"])
        for u in map(json.loads, report.read_text().splitlines())
        if u["outcome"] in ("accepted", "duplicate")
    }
    assert acked == {(r[1], r[2]) for r in rows}
    assert status.discarded_updates == len(lost)
    assert logs["aggregator"].read_text().count('"task recovered"') >= 2


@pytest.mark.slow
def test_separate_role_processes_run_a_tee_dp_task_to_completion(tmp_path: Path) -> None:
    """FedBuff over the TEE secure buffer with DP noise added in the enclave, which runs in
    its own process beside the aggregator: clients verify the attestation the aggregator's
    lease carries, upload masked vectors to the aggregator, no upload is wasted on a buffer
    that already has the device's update, and epsilon (through the selector) counts exactly
    one release per step."""
    steps, k = 8, 3
    task = {
        "id": "tee",
        "algorithm": {"name": "fedbuff", "concurrency": 6, "buffer_size": k},
        "max_server_steps": steps,
        "population": 120,
        "privacy": {"enabled": True, "noise_multiplier": 1.0, "clip_norm": 1.0},
        "secure_aggregation": {"mode": "tee", "tee_backend": "subprocess"},
        **TASK,
        "model": {"name": "logistic"},
        "server_optimizer": {"name": "sgd", "lr": 1.0},
    }
    uploads, status, logs = _run_split(tmp_path, task, "0-7")
    with ledger(tmp_path) as db:
        version = db.execute("SELECT version FROM tasks").fetchone()[0]
        rows = db.execute(
            "SELECT client_id, upload_id, status, applied_version, delta FROM updates"
        ).fetchall()
        notes = dict(db.execute("SELECT version, releases FROM release_notes").fetchall())
    assert version == steps
    applied = [r for r in rows if r[2] == "applied"]
    per_version: dict[int, set[int]] = {}
    for r in applied:
        per_version.setdefault(r[3], set()).add(r[0])
    # K distinct devices per released step, each applied once; rows hold masked vectors.
    assert {v: len(c) for v, c in per_version.items()} == {v: k for v in range(1, steps + 1)}
    assert len(applied) == k * steps
    t = build_config(ServiceConfig, {"auth": {"secret_file": "x"}, "tasks": [task]}).tasks[0]
    dim = int(initial_params(t).shape[0])
    assert all(r[4] is not None and len(r[4]) in (4 * dim, 8 * dim) for r in applied)
    # Whatever was still buffered when the task finished was never released.
    assert {r[2] for r in rows} <= {"applied", "buffered"}
    acked = {(u["client_id"], u["upload_id"]) for u in uploads if u["outcome"] == "accepted"}
    assert acked == {(r[0], r[1]) for r in rows}
    outcomes = {u["outcome"] for u in uploads}
    assert outcomes <= {"accepted", "task_finished", "privacy_budget_spent"}, outcomes
    # Privacy: one release per step, accounted, and Status (through the selector) says so.
    assert notes == dict.fromkeys(range(steps), 1)
    (eps,) = reference_epsilons(
        steps, noise_multiplier=1.0, clip_norm=1.0, cohort_size=k, population=120
    )[-1:]
    assert status.finished and status.model_version == steps
    assert status.epsilon == pytest.approx(eps, rel=1e-9)
    assert "duplicate_client" not in status.rejected
    # The data path bypassed the selector.
    assert logs["aggregator"].count('"update accepted"') == len(rows)
    assert '"update accepted"' not in logs["selector"] + logs["coordinator"]


@pytest.mark.slow
def test_separate_role_processes_run_a_secagg_fedavg_task_to_completion(tmp_path: Path) -> None:
    """FedAvg rounds through SecAgg: the lease (from the aggregator, via the selector)
    carries the round parameters, and every protocol stage goes to the aggregator; each
    round is applied once and its stored sum replays to the final checkpoint."""
    steps, cohort = 6, 4
    task = {
        "id": "sa",
        "algorithm": {"name": "fedavg", "cohort_size": cohort},
        "max_server_steps": steps,
        "secure_aggregation": {"mode": "secagg"},
        "secagg_stage_timeout_s": 5.0,
        **TASK,
        "model": {"name": "logistic"},
    }
    uploads, status, logs = _run_split(tmp_path, task, "0-7")
    assert check_secure_ledger_exactly_once(tmp_path, task, participants=cohort) == steps
    with ledger(tmp_path) as db:
        rows = set(db.execute("SELECT client_id, upload_id FROM updates").fetchall())
    accepted = {(u["client_id"], u["upload_id"]) for u in uploads if u["outcome"] == "accepted"}
    assert accepted == rows and len(rows) == cohort * steps
    assert status.finished and status.model_version == steps
    assert logs["aggregator"].count('"secagg round applied"') == steps
    assert "secagg" not in logs["selector"] + logs["coordinator"]


@pytest.mark.slow
def test_separate_role_processes_run_a_lightsecagg_task_to_completion(tmp_path: Path) -> None:
    """FedBuff over LightSecAgg: the selector lists each device's group with its aggregator,
    and registration, mailbox polls, answers and uploads all go to the aggregator; every
    step applies K masked contributions once."""
    steps, k, n = 4, 2, 4
    task = {
        "id": "lsa",
        "algorithm": {"name": "fedbuff", "concurrency": n, "buffer_size": k},
        "max_server_steps": steps,
        "population": n,
        "secure_aggregation": {"mode": "lightsecagg", "frac_bits": 16, "weight_bits": 6},
        "lightsecagg_answer_timeout_s": 30.0,
        **TASK,
        "model": {"name": "logistic"},
        "server_optimizer": {"name": "sgd", "lr": 1.0},
    }
    uploads, status, logs = _run_split(tmp_path, task, f"0-{n - 1}")
    with ledger(tmp_path) as db:
        rows = db.execute("SELECT client_id, upload_id, status, applied_version FROM updates")
        rows = rows.fetchall()
    applied = [r for r in rows if r[2] == "applied"]
    assert sorted(r[3] for r in applied) == [v for v in range(1, steps + 1) for _ in range(k)]
    assert {r[2] for r in rows} <= {"applied", "discarded"}
    acked = {(u["client_id"], u["upload_id"]) for u in uploads if u["outcome"] == "accepted"}
    assert acked == {(r[0], r[1]) for r in rows}
    assert {u["outcome"] for u in uploads} <= {"accepted", "task_finished"}
    assert status.finished and status.model_version == steps
    assert logs["aggregator"].count('"update accepted"') == len(rows)
    assert '"update accepted"' not in logs["selector"] + logs["coordinator"]
