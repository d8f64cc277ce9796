"""Helpers of the service tests: configs, server/client subprocesses on 127.0.0.1, the ledger."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import yaml

from asyncfl.algorithms.factory import make_aggregator
from asyncfl.core.configload import build_config
from asyncfl.core.server_opt import make_server_optimizer
from asyncfl.core.update import Update
from asyncfl.privacy import PrivacyAccountant, PrivacyConfig
from asyncfl.service.auth import Secret, bearer_metadata
from asyncfl.service.checkpoint import read_checkpoint
from asyncfl.service.config import ServiceConfig
from asyncfl.service.proto.asyncfl.v1 import service_pb2 as pb
from asyncfl.service.proto.asyncfl.v1 import service_pb2_grpc as pb_grpc

# scikit-learn digits over 12 clients with mild label skew: every client's data covers the same
# task, so which clients happen to upload most (real arrival order on a loaded machine) changes
# little of what the model learns, and service and simulator can be compared. (On FedProx
# Synthetic(0.5, 0.5) a model trained by half the clients scores 0.37 against 0.72.)
DATA = {"name": "digits", "num_clients": 12, "dirichlet_alpha": 5.0}
INPUT_SHAPE = [64]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_setup(tmp: Path, task: dict[str, Any], port: int, **storage: Any) -> Path:
    """Server config + secret + client data config in ``tmp``; returns the server config path."""
    (tmp / "secret").write_text(secrets.token_hex(32))
    (tmp / "data.yaml").write_text(yaml.safe_dump({"seed": 0, "data": DATA}))
    cfg = {
        "server": {"host": "127.0.0.1", "port": port, "insecure": True},
        "auth": {"secret_file": str(tmp / "secret")},
        "storage": {"dir": str(tmp / "state"), **storage},
        "selector": {"retry_after_s": 0.05},
        "tasks": [task],
    }
    path = tmp / "server.yaml"
    path.write_text(yaml.safe_dump(cfg))
    build_config(ServiceConfig, cfg)  # fail here, not in a subprocess, if the test config is bad
    return path


def start_server(config: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncfl.cli", "serve", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start listening within 30 s")


def start_clients(
    tmp: Path, port: int, ids: str, report: Path, extra: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "asyncfl.cli",
            "client",
            "--server",
            f"127.0.0.1:{port}",
            "--clients",
            ids,
            "--data-config",
            str(tmp / "data.yaml"),
            "--secret-file",
            str(tmp / "secret"),
            "--insecure",
            "--report",
            str(report),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finish_clients(
    clients: subprocess.Popen[bytes],
    timeout: float,
    servers: Sequence[subprocess.Popen[Any]] = (),
    logs: Sequence[Path] = (),
) -> tuple[bytes, bytes]:
    """``clients.communicate(timeout)``; on a timeout, fail with what every process was
    waiting on: each gets SIGUSR1 (asyncfl.service.diagnostics prints its asyncio tasks to
    stderr, which for servers is their log), then the client's stderr and each log's tail
    are in the failure message."""
    try:
        return clients.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    for p in (clients, *servers):
        if p.poll() is None:
            os.kill(p.pid, signal.SIGUSR1)
    time.sleep(1.5)
    clients.kill()
    _, err = clients.communicate()
    parts = [f"clients still running after {timeout} s; their stderr:", err.decode()[-6000:]]
    for log in logs:
        text = log.read_text(errors="replace") if log.exists() else "(no log)"
        parts += [f"--- tail of {log.name}:", text[-6000:]]
    raise AssertionError("\n".join(parts))


def ledger(tmp: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{tmp / 'state' / 'ledger.sqlite'}?mode=ro", uri=True)


def task_version(tmp: Path, task_id: str) -> int:
    try:
        with ledger(tmp) as db:
            row = db.execute("SELECT version FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
    except sqlite3.Error:
        return -1
    return -1 if row is None else int(row[0])


def check_ledger_exactly_once(tmp: Path, task: dict[str, Any], per_step: int) -> int:
    """Every applied update applied once, ``per_step`` per version, and the final checkpoint is
    exactly what replaying the ledger from the initial checkpoint gives. Returns the version."""
    cfg = build_config(ServiceConfig, {"auth": {"secret_file": "x"}, "tasks": [task]}).tasks[0]
    with ledger(tmp) as db:
        version, ckpt_name = db.execute(
            "SELECT version, checkpoint FROM tasks WHERE task_id = ?", (cfg.id,)
        ).fetchone()
        rows = db.execute(
            "SELECT client_id, upload_id, base_version, num_examples, applied_version, delta "
            "FROM updates WHERE task_id = ? AND status = 'applied' ORDER BY seq",
            (cfg.id,),
        ).fetchall()
        dup = db.execute(
            "SELECT COUNT(*) FROM (SELECT client_id, upload_id FROM updates "
            "GROUP BY client_id, upload_id HAVING COUNT(*) > 1)"
        ).fetchone()[0]
    assert dup == 0
    per_version: dict[int, int] = {}
    for r in rows:
        per_version[r[4]] = per_version.get(r[4], 0) + 1
    assert per_version == {v: per_step for v in range(1, version + 1)}, per_version
    # Replay from the initial model: the final checkpoint must be reproduced bit for bit.
    ckpt_dir = tmp / "state" / "checkpoints"
    from asyncfl.service.task import initial_params

    params = initial_params(cfg)
    opt = make_server_optimizer(cfg.server_optimizer, params.shape[0])
    agg = make_aggregator(cfg.algorithm, params, opt)
    for client, _uid, base, n, _v, blob in rows:
        delta = np.frombuffer(blob, dtype="<f4").astype(np.float32)
        out = agg.on_update(Update(client, base, n, delta))
        assert out.accepted, out
    final = read_checkpoint(ckpt_dir / ckpt_name)
    assert final.version == version == agg.version
    np.testing.assert_array_equal(final.params, agg.params)
    return int(version)


def check_secure_ledger_exactly_once(tmp: Path, task: dict[str, Any], participants: int) -> int:
    """A secagg task's ledger: per version one applied round of ``participants`` whose
    survivors' rows hold no delta, and replaying the stored sums through
    ``Aggregator.on_aggregate`` from the initial model reproduces the final checkpoint bit for
    bit (each round applied exactly once). Needs ``keep_applied_deltas``. Returns the version."""
    cfg = build_config(ServiceConfig, {"auth": {"secret_file": "x"}, "tasks": [task]}).tasks[0]
    with ledger(tmp) as db:
        version, ckpt_name = db.execute(
            "SELECT version, checkpoint FROM tasks WHERE task_id = ?", (cfg.id,)
        ).fetchone()
        rows = db.execute(
            "SELECT applied_version, status, delta FROM updates WHERE task_id = ?", (cfg.id,)
        ).fetchall()
        rounds = db.execute(
            "SELECT version, participants, survivors, total_weight, aggregate FROM secure_rounds "
            "WHERE task_id = ? ORDER BY version",
            (cfg.id,),
        ).fetchall()
    assert all(status == "applied" and delta is None for _, status, delta in rows)
    assert [r[0] for r in rounds] == list(range(1, version + 1))
    per_version: dict[int, int] = {}
    for v, _, _ in rows:
        per_version[v] = per_version.get(v, 0) + 1
    assert per_version == {r[0]: r[2] for r in rounds}
    assert all(r[1] == participants for r in rounds)
    from asyncfl.service.task import initial_params

    params = initial_params(cfg)
    opt = make_server_optimizer(cfg.server_optimizer, params.shape[0])
    agg = make_aggregator(cfg.algorithm, params, opt)
    for v, _, survivors, total, blob in rounds:
        summed = np.frombuffer(blob, dtype="<f4").astype(np.float32)
        out = agg.on_aggregate(v - 1, summed, total, survivors)
        assert out.step is not None, out
    final = read_checkpoint(tmp / "state" / "checkpoints" / ckpt_name)
    assert final.version == version == agg.version
    np.testing.assert_array_equal(final.params, agg.params)
    return int(version)


def child_pids(pid: int) -> list[int]:
    """Child process ids of ``pid`` (e.g. a server's enclave)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def is_gone(pid: int) -> bool:
    """Exited (or a zombie nobody has reaped yet: its code no longer runs)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def buffered_rows(tmp: Path) -> int:
    """Ledger rows accepted but not yet applied or discarded."""
    with ledger(tmp) as db:
        return int(
            db.execute("SELECT COUNT(*) FROM updates WHERE status = 'buffered'").fetchone()[0]
        )


def kill_9_with_rows_buffered(
    host: subprocess.Popen[Any], tmp: Path, task_id: str, steps: int
) -> tuple[int, set[int]]:
    """SIGKILL ``host`` (a server or aggregator whose task runs a subprocess enclave) once
    the task is past version 3 with rows buffered, and wait until its enclave is gone too.
    The host is frozen (SIGSTOP) before the final look, since the buffer may release between
    a read and the kill. Returns the version at the kill and the seqs of the rows buffered."""
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline, "no progress before the crash"
        if task_version(tmp, task_id) >= 3 and buffered_rows(tmp):
            host.send_signal(signal.SIGSTOP)
            if buffered_rows(tmp) and task_version(tmp, task_id) < steps:
                break
            host.send_signal(signal.SIGCONT)
        time.sleep(0.02)
    enclaves = child_pids(host.pid)
    assert enclaves, "the subprocess enclave is not running"
    host.send_signal(signal.SIGKILL)
    host.wait(timeout=10)
    gone_by = time.monotonic() + 10
    while not all(map(is_gone, enclaves)):  # it sees its socket close and exits
        assert time.monotonic() < gone_by, "the enclave outlived its host"
        time.sleep(0.05)
    killed_at = task_version(tmp, task_id)
    assert killed_at < steps, "the task finished before the kill"
    with ledger(tmp) as db:
        lost = {r[0] for r in db.execute("SELECT seq FROM updates WHERE status = 'buffered'")}
    return killed_at, lost


def reference_epsilons(
    steps: int, *, noise_multiplier: float, clip_norm: float, cohort_size: int, population: int
) -> list[float]:
    """Epsilon after 0..``steps`` releases from an accountant configured by hand, not via the
    service (delta = 1 / (10 population), async sampling, as the DP test tasks use)."""
    acc = PrivacyAccountant(
        PrivacyConfig(
            noise_multiplier=noise_multiplier,
            clip_norm=clip_norm,
            cohort_size=cohort_size,
            population=population,
            delta=1.0 / (10 * population),
            sampling="async_approx",
        )
    )
    out = [acc.epsilon()]
    for _ in range(steps):
        acc.record_step()
        out.append(acc.epsilon())
    return out


async def operator_status(port: int, secret: Secret) -> pb.TaskStatus:
    """The only task's Status, asked on 127.0.0.1:``port`` with the operator's token."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.FederatedLearningStub(ch)  # type: ignore[no-untyped-call]
        resp = await stub.Status(
            pb.StatusRequest(), metadata=bearer_metadata(secret.token("operator"))
        )
    (task,) = resp.tasks
    assert isinstance(task, pb.TaskStatus)
    return task
