"""Roles as separate OS processes on 127.0.0.1: ``asyncfl serve --role coordinator``,
``--role selector`` and ``--role aggregator`` with client processes that know only the
selector's address. A FedBuff task runs to completion with the ledger exactly once; then the
aggregator is killed with SIGKILL mid-task, restarted on the same storage, and the task
finishes with every accepted update applied exactly once."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from _service_util import (
    INPUT_SHAPE,
    check_ledger_exactly_once,
    free_port,
    ledger,
    start_clients,
    task_version,
    write_setup,
)

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
            out, err = c.communicate(timeout=60)
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
        _, err = clients.communicate(timeout=60)
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
