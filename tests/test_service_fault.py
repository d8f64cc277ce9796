"""Crash recovery: ``kill -9`` the server mid-task, restart it, and the task completes with
every accepted update applied exactly once (checked from the ledger, the checkpoint versions,
a bit-exact replay of the ledger, and the uploads the clients saw acknowledged)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from _service_util import (
    INPUT_SHAPE,
    check_ledger_exactly_once,
    free_port,
    ledger,
    start_clients,
    start_server,
    task_version,
    write_setup,
)


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
        _, err = clients.communicate(timeout=60)
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
